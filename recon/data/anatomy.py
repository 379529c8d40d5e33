"""Anatomy that ships inside installed packages, resliced per simulated subject.

Sources (nothing is downloaded):

* ``mni152`` — nilearn's bundled MNI152 2009 T1 template (1 mm, skull-stripped) with its grey-
  and white-matter probability maps (``nilearn.datasets.MNI152_FILE_PATH`` and siblings).
* ``epi`` — nibabel's bundled real EPI test volume ``example4d.nii.gz`` (first time point).
* ``nifti`` — any NIfTI magnitude volume a user brings.

Contrasts: ``t1`` is the template itself; ``t2``, ``pd`` and ``flair`` are synthesised from the
tissue maps, ``I = ρ_csf·csf + ρ_gm·gm + ρ_wm·wm`` with ``csf = clip(brain − gm − wm, 0, 1)``
(:data:`TISSUE_WEIGHTS`); ``native`` takes the volume's own intensities (the only contrast of
``epi`` and ``nifti``).

Geometry: a slice is a plane through the anatomy's signal centre, on a square-pixel grid of
spacing ``fov_mm / min(H, W)``. Axial planes show anterior at the top, coronal and sagittal
planes superior at the top. A :class:`Subject` warps the anatomy (small random rotation,
scaling, translation and a smooth random displacement field, all in mm) and multiplies it by a
smooth log-polynomial intensity bias field; the bias lives in scanner coordinates, the warp moves
the anatomy under it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from recon.data.nifti import read_nifti_magnitude
from recon.errors import InputError

__all__ = [
    "ANATOMY_SOURCES",
    "CONTRASTS",
    "ORIENTATIONS",
    "TISSUE_WEIGHTS",
    "SLICE_RANGES",
    "Anatomy",
    "Subject",
    "load_anatomy",
    "epi_example_path",
    "random_subject",
    "slice_offsets_mm",
    "render_slice",
    "background_phase",
]

ANATOMY_SOURCES = ("mni152", "epi", "nifti")
CONTRASTS = ("t1", "t2", "pd", "flair", "native")
ORIENTATIONS = ("axial", "coronal", "sagittal")

TISSUE_WEIGHTS: dict[str, tuple[float, float, float]] = {
    # (csf, grey matter, white matter) proton-density-times-weighting, relative
    "t2": (1.00, 0.62, 0.42),
    "pd": (0.92, 0.80, 0.66),
    "flair": (0.10, 0.78, 0.52),
}

SLICE_RANGES: dict[str, tuple[float, float]] = {
    # fraction of the signal's bounding box along the slice axis from which slices are drawn
    "axial": (0.35, 0.80),
    "coronal": (0.25, 0.75),
    "sagittal": (0.20, 0.42),
}

# voxel axes (x, y, z) ≈ (R, A, S) after canonical reorientation; (slice axis, row dir, col dir)
_PLANES: dict[str, tuple[int, tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": (2, (0.0, -1.0, 0.0), (1.0, 0.0, 0.0)),
    "coronal": (1, (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
    "sagittal": (0, (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)),
}

_FOV_MARGIN = 1.15


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A loaded anatomy source (read-only arrays, cached per source).

    Shape: every ``channels`` entry ``(X, Y, Z)`` float32 on the same voxel grid; ``voxel_mm``,
    ``center_mm``, ``bbox_mm`` are per voxel axis (``bbox_mm`` ``(3, 2)`` min/max in mm).

    Attributes:
        name: Source name (``mni152``, ``epi`` or the NIfTI path).
        channels: ``native`` always; ``gm``, ``wm``, ``brain`` for ``mni152``.
        voxel_mm: Voxel size.
        center_mm: Centre of the signal's bounding box (mm from voxel 0).
        bbox_mm: Bounding box of the signal (mm from voxel 0).
        fov_mm: In-plane field of view for the smaller matrix side.
    """

    name: str
    channels: dict[str, np.ndarray]
    voxel_mm: np.ndarray
    center_mm: np.ndarray
    bbox_mm: np.ndarray
    fov_mm: float


def epi_example_path() -> Path:
    """Path of nibabel's bundled real EPI volume ``tests/data/example4d.nii.gz``."""
    return Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


def _canonical(path: Path, volume: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude volume reoriented to the closest RAS+ voxel axes, and its voxel sizes."""
    vol = read_nifti_magnitude(path, volume)
    ornt = nib.orientations.io_orientation(vol.affine)
    data = nib.orientations.apply_orientation(vol.data, ornt)
    voxel = np.asarray(vol.voxel_mm, dtype=np.float64)[ornt[:, 0].astype(int).argsort()]
    return data, voxel


def _geometry(native: np.ndarray, voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    threshold = 0.1 * np.percentile(native[native > 0], 99)
    idx = np.nonzero(native > threshold)
    lo = np.array([i.min() for i in idx], dtype=np.float64) * voxel
    hi = np.array([i.max() for i in idx], dtype=np.float64) * voxel
    bbox = np.stack([lo, hi], axis=1)
    fov = _FOV_MARGIN * float((hi - lo).max())
    return (lo + hi) / 2, bbox, fov


@functools.lru_cache(maxsize=4)
def load_anatomy(source: str, path: str | None = None) -> Anatomy:
    """Load (once per process) an anatomy source.

    Maths: ``mni152`` channels are the uint8 files / 255; ``brain = [T1 > 0]``.

    Shape: see :class:`Anatomy`.

    Args:
        source: ``mni152``, ``epi`` or ``nifti``.
        path: The NIfTI file for ``nifti`` (ignored otherwise).

    Raises:
        InputError: unknown source, missing bundled files, or a bad NIfTI file.
    """
    if source == "mni152":
        from nilearn import datasets  # heavy import, only when needed

        files = {"native": datasets.MNI152_FILE_PATH, "gm": datasets.GM_MNI152_FILE_PATH, "wm": datasets.WM_MNI152_FILE_PATH}
        channels = {}
        for key, file in files.items():
            if not Path(file).is_file():
                raise InputError(f"{file}: file not found, expected nilearn's bundled MNI152 template ({key}).")
            channels[key] = np.asarray(nib.load(str(file)).dataobj, dtype=np.float32) / 255.0
        channels["brain"] = (channels["native"] > 0).astype(np.float32)
        voxel = np.ones(3)
        center, bbox, fov = _geometry(channels["native"], voxel)
        return Anatomy("mni152", {k: _frozen(v) for k, v in channels.items()}, voxel, center, bbox, fov)
    if source in ("epi", "nifti"):
        file = epi_example_path() if source == "epi" else Path(path or "")
        if source == "nifti" and not path:
            raise InputError("anatomy.path: key 'anatomy.path' is empty, expected a NIfTI file for anatomy.source 'nifti'.")
        data, voxel = _canonical(file)
        data = data / np.float32(np.percentile(data[data > 0], 99.5))
        center, bbox, fov = _geometry(data, voxel)
        return Anatomy("epi" if source == "epi" else str(file), {"native": _frozen(data)}, voxel, center, bbox, fov)
    raise InputError(f"anatomy.source: key 'anatomy.source' must be one of {', '.join(ANATOMY_SOURCES)}, got {source!r}.")


@dataclass(frozen=True, eq=False)
class Subject:
    """A simulated subject: a smooth warp of the anatomy and an intensity bias field.

    Maths: ``q = c + A (p − c) + t + d(p − c)`` (mm); ``b(p) = exp(Σ_k a_k P_k((p − c)/L))``
    with ``P_k`` the 9 non-constant monomials of degree ≤ 2.

    Shape: ``linear`` ``(3, 3)``; ``translation_mm`` ``(3,)``; ``displacement_mm``
    ``(3, n, n, n)`` on a lattice spanning ``[−L, L]³``; ``bias_coeffs`` ``(9,)``.
    """

    linear: np.ndarray
    translation_mm: np.ndarray
    displacement_mm: np.ndarray
    half_extent_mm: float
    bias_coeffs: np.ndarray


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_subject(
    rng: np.random.Generator, anatomy: Anatomy, deformation_mm: float, bias_field: float, lattice: int = 5
) -> Subject:
    """Draw a subject's warp and bias field.

    Maths: angles ``~ N(0, (δ/3)·3°)``, scales ``~ 1 + N(0, (δ/3)·0.03)``, translation and
    lattice displacements ``~ N(0, δ)`` mm (``δ = deformation_mm``); ``a_k ~ N(0, β/2)``
    (``β = bias_field``, roughly the std of the log-bias over the field of view).

    Shape: see :class:`Subject`.
    """
    k = deformation_mm / 3.0
    angles = rng.normal(0.0, k * math.radians(3.0), size=3)
    scales = 1.0 + rng.normal(0.0, k * 0.03, size=3)
    linear = _rotation(angles) @ np.diag(scales)
    translation = rng.normal(0.0, deformation_mm, size=3)
    displacement = rng.normal(0.0, deformation_mm, size=(3, lattice, lattice, lattice))
    coeffs = rng.normal(0.0, bias_field / 2.0, size=9)
    return Subject(linear, translation, displacement, anatomy.fov_mm / 2 * 1.3, coeffs)


def slice_offsets_mm(anatomy: Anatomy, orientation: str, fractions: np.ndarray) -> np.ndarray:
    """Slice positions along the slice axis, as mm offsets from the anatomy's centre.

    Maths: ``s = lo + f (hi − lo) − c`` along the slice axis with ``f`` mapped into
    :data:`SLICE_RANGES` ``[orientation]``.

    Shape: ``fractions`` ``(N,)`` in ``[0, 1]`` → ``(N,)`` float64.
    """
    axis = _PLANES[orientation][0]
    lo, hi = anatomy.bbox_mm[axis]
    a, b = SLICE_RANGES[orientation]
    f = a + (b - a) * np.asarray(fractions, dtype=np.float64)
    return lo + f * (hi - lo) - anatomy.center_mm[axis]


def _plane_points(anatomy: Anatomy, orientation: str, offset_mm: float, matrix: tuple[int, int]) -> np.ndarray:
    height, width = matrix
    axis, row_dir, col_dir = _PLANES[orientation]
    spacing = anatomy.fov_mm / min(height, width)
    r = (np.arange(height) - (height - 1) / 2) * spacing
    c = (np.arange(width) - (width - 1) / 2) * spacing
    rr, cc = np.meshgrid(r, c, indexing="ij")
    normal = np.zeros(3)
    normal[axis] = 1.0
    pts = rr[None] * np.asarray(row_dir)[:, None, None] + cc[None] * np.asarray(col_dir)[:, None, None]
    return pts + offset_mm * normal[:, None, None]  # (3, H, W) mm relative to the centre


def _warp(subject: Subject, rel: np.ndarray) -> np.ndarray:
    flat = rel.reshape(3, -1)
    moved = subject.linear @ flat + subject.translation_mm[:, None]
    n = subject.displacement_mm.shape[-1]
    lattice = (flat / subject.half_extent_mm + 1.0) * (n - 1) / 2.0
    disp = np.stack(
        [ndimage.map_coordinates(subject.displacement_mm[i], lattice, order=3, mode="nearest") for i in range(3)]
    )
    return (moved + disp).reshape(rel.shape)


def _bias(subject: Subject, rel: np.ndarray) -> np.ndarray:
    u = rel / subject.half_extent_mm
    x, y, z = u
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    log_b = sum(a * t for a, t in zip(subject.bias_coeffs, terms))
    return np.exp(log_b)


def render_slice(
    anatomy: Anatomy,
    subject: Subject,
    contrast: str,
    orientation: str,
    offset_mm: float,
    matrix: tuple[int, int],
) -> np.ndarray:
    """Magnitude image of one slice of a warped, bias-modulated subject.

    Maths: ``m(p) = b(p) · I_contrast(q(p))``, trilinear interpolation, zero outside the volume.

    Shape: returns ``(H, W)`` float64 ≥ 0 for ``matrix = (H, W)``.

    Raises:
        InputError: unknown contrast/orientation, or a contrast the source does not provide.
    """
    if orientation not in ORIENTATIONS:
        raise InputError(f"anatomy.orientation: key 'anatomy.orientation' must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}.")
    if contrast not in CONTRASTS:
        raise InputError(f"anatomy.contrast: key 'anatomy.contrast' must be one of {', '.join(CONTRASTS)}, got {contrast!r}.")
    if contrast in TISSUE_WEIGHTS and "gm" not in anatomy.channels:
        raise InputError(
            f"anatomy.contrast: key 'anatomy.contrast' {contrast!r} needs tissue maps, which only 'mni152' has; "
            f"expected 'native' for {anatomy.name}."
        )
    rel = _plane_points(anatomy, orientation, offset_mm, matrix)
    voxel = (_warp(subject, rel) + anatomy.center_mm[:, None, None]) / anatomy.voxel_mm[:, None, None]

    def sample(channel: str) -> np.ndarray:
        return ndimage.map_coordinates(anatomy.channels[channel], voxel, order=1, mode="constant", cval=0.0).astype(np.float64)

    if contrast in ("t1", "native"):
        image = sample("native")
    else:
        gm, wm, brain = sample("gm"), sample("wm"), sample("brain")
        csf = np.clip(brain - gm - wm, 0.0, 1.0)
        w_csf, w_gm, w_wm = TISSUE_WEIGHTS[contrast]
        image = w_csf * csf + w_gm * gm + w_wm * wm
    return np.clip(image, 0.0, None) * _bias(subject, rel)


def background_phase(rng: np.random.Generator, matrix: tuple[int, int], amplitude: float) -> np.ndarray:
    """Smooth background phase of one slice.

    Maths: ``φ = φ₀ + amplitude · Σ_k a_k P_k(u, v) / √5``, ``φ₀ ~ U(−π, π)``, ``a_k ~ N(0, 1)``,
    ``P_k ∈ {u, v, u² − ⅓, v² − ⅓, u v}`` on ``u, v ∈ [−1, 1]``.

    Shape: returns ``(H, W)`` float64 (radians).
    """
    height, width = matrix
    u, v = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    phi0 = rng.uniform(-math.pi, math.pi)
    a = rng.normal(size=5)
    terms = (u, v, u * u - 1 / 3, v * v - 1 / 3, u * v)
    return phi0 + amplitude * sum(ak * t for ak, t in zip(a, terms)) / math.sqrt(5)
