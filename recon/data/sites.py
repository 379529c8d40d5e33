"""Sites: the schema of ``configs/sites/*.yaml``, the one loader, and the site simulator.

A site says where its data come from — a user's fastMRI folder (``data.source: fastmri``,
``data.root``) or the built-in simulator (``data.source: simulated``) — and how they are acquired
(mask type, acceleration, centre fraction), with which coils and how much noise.

Simulator (retrospective): for every subject, a warped and bias-modulated anatomy
(:mod:`recon.data.anatomy`) with a smooth background phase gives complex images ``x`` — or, for
``anatomy.source: images``, the slices of a real image stack (:mod:`recon.data.images`) of the
site's split ``data.split``, at their own matrix, with their own phase when complex; coil
k-space is ``y_c = fft2c(S_c x) + n_c`` (:mod:`recon.data.acquisition`), fully sampled. Files are
fastMRI multi-coil volumes: ``kspace`` ``(slices, coils, H, W)`` complex64,
``reconstruction_rss = rss(ifft2c(y))`` (fastMRI's target: RSS of the fully sampled *noisy*
data), ``reconstruction_clean = rss(ifft2c(fft2c(S x))) = |x|`` (the clean reference: the image
before simulated noise, magnitude; the maps' RSS is 1), the true maps as ``sens_maps``, an
``ismrmrd_header``, and attributes ``acquisition``, ``max``, ``norm``, ``noise_sigma`` (true σ per
complex entry, raw scale), ``site``, ``seed``, ``site_config``. The site's mask is applied at load
time by :class:`FastMRISliceDataset`.

Noise level: ``σ_raw = noise.sigma · median_s(scale_s)`` per volume, with ``scale_s`` the
:func:`~recon.data.normalization_scale` of slice ``s``'s noiseless fully sampled k-space, so
``noise.sigma`` is the noise level on the normalised scale of a typical slice.

Seeds: subject ``i`` of an evaluation folder uses ``SeedSequence(seed, spawn_key=(EVAL, i +
data.subject_seed_offset))``; training subject ``j`` of :func:`training_images` uses
``SeedSequence(seed, spawn_key=(TRAIN, j))``. The two streams have different spawn keys, so a
training subject never shares a deformation seed with an evaluation subject, for any seeds. Image
stacks: the file starting at stack index ``k`` uses ``(EVAL, k)``; training copy ``r`` of slice ``k``
uses ``(TRAIN, k, r)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recon.coils import rss
from recon.data.acquisition import MIN_RADIUS, birdcage_sens_maps, coil_noise_covariance, complex_noise
from recon.data.anatomy import (
    ANATOMY_SOURCES,
    CONTRASTS,
    ORIENTATIONS,
    background_phase,
    load_anatomy,
    random_subject,
    render_slice,
    slice_offsets_mm,
)
from recon.data.fastmri_io import FastMRISliceDataset, ismrmrd_header, slice_mask_seed, write_kspace_volume
from recon.data.images import fit_matrix, read_image_stack, reslice, resolve_data_path, split_indices
from recon.data.normalize import normalization_scale
from recon.errors import InputError
from recon.fft import fft2c, ifft2c
from recon.masks import MASK_TYPES, make_mask
from recon.resources import config_path

__all__ = [
    "DataConfig",
    "AnatomyConfig",
    "CoilConfig",
    "AcquisitionConfig",
    "NoiseConfig",
    "SiteConfig",
    "SITES_DIR",
    "EVAL_STREAM",
    "TRAIN_STREAM",
    "available_sites",
    "site_prior",
    "load_site",
    "subject_seed",
    "simulate_site",
    "site_dataset",
    "training_images",
]

SITES_DIR = config_path("sites")
"""``configs/sites``, shipped as package data (:mod:`recon.resources`)."""

EVAL_STREAM = 0x4556414C  # "EVAL"
TRAIN_STREAM = 0x5452414E  # "TRAN"

TRAINING_SLICES_PER_SUBJECT = 16
IMAGES = "images"
FASTMRI_CENTER_PRODUCT = 0.32
"""fastMRI pairs 4x with an 8 % centre and 8x with 4 %: ``center_fraction = 0.32 / acceleration``."""
SOURCES = ANATOMY_SOURCES + (IMAGES,)
DEFAULT_TRAINING_SLICES = 256


@dataclass
class DataConfig:
    """Where the data come from."""

    source: str = "simulated"  # "simulated" | "fastmri"
    root: Optional[str] = None  # fastMRI folder (data.source fastmri)
    num_subjects: int = 2  # simulated anatomy (not image stacks: there the split decides)
    slices_per_subject: int = 4  # image stacks: consecutive slices of the split per file
    subject_seed_offset: int = 0
    splits: Dict[str, List[str]] = field(default_factory=dict)  # image stacks: {name: ["start:stop", ...]}
    split: str = "test"  # image stacks: the split this site's evaluation files hold
    split_gap: int = 0  # image stacks: slices that must lie between any two splits (slabs of one volume)


@dataclass
class AnatomyConfig:
    """Simulated anatomy (ignored for fastMRI sites)."""

    source: str = "mni152"  # "mni152" | "epi" | "nifti" | "images"
    path: Optional[str] = None  # NIfTI file for source "nifti"; the image stack for "images"
    key: Optional[str] = None  # the array of an .npz image stack
    intensity_scale: float = 1.0  # image stacks: raw-scale factor on the images (a scanner's scale, e.g. 1e13)
    contrast: str = "t1"  # "t1" | "t2" | "pd" | "flair" | "native"
    orientation: str = "axial"  # "axial" | "coronal" | "sagittal" (image stacks: the stack as stored is axial)
    deformation_mm: float = 3.0
    bias_field: float = 0.2
    background_phase: float = 1.5  # radians of smooth phase variation across the field of view


@dataclass
class CoilConfig:
    """Simulated receive coils (ignored for fastMRI sites)."""

    count: int = 8
    radius: float = 1.5
    rotation_deg: float = 0.0
    correlation: float = 0.0


@dataclass
class AcquisitionConfig:
    """Matrix (simulated sites) and the retrospective sampling mask."""

    matrix: List[int] = field(default_factory=lambda: [128, 128])
    mask_type: str = "equispaced_1d"
    acceleration: float = 4.0
    center_fraction: Optional[float] = 0.08  # null: fastMRI's pairing 0.32 / acceleration (4x: 0.08, 8x: 0.04)
    mask_seed: int = 0


@dataclass
class NoiseConfig:
    """Simulated noise, relative to the normalised image scale."""

    sigma: float = 0.005


@dataclass
class SiteConfig:
    """One site (``configs/sites/NAME.yaml``)."""

    name: str = ""
    description: str = ""
    prior: Optional[str] = None  # the bundled prior (or checkpoint file) that --prior defaults to on this site
    data: DataConfig = field(default_factory=DataConfig)
    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)
    coils: CoilConfig = field(default_factory=CoilConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


def available_sites() -> list[str]:
    """Names of the sites in ``configs/sites``."""
    return sorted(p.stem for p in SITES_DIR.glob("*.yaml"))


def _locate(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise InputError(f"{candidate}: site file not found, expected a site YAML (see configs/sites/).")
        return candidate
    path = SITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(
            f"{SITES_DIR}: key 'site' {name_or_path!r} is unknown, expected one of: {', '.join(available_sites()) or '(none)'}."
        )
    return path


def site_prior(name_or_path: str, overrides: list[str] | None = None) -> tuple[str | None, Path]:
    """The site's ``prior`` key (after ``prior=...`` in ``overrides``) and the site's YAML file, read without
    validating the rest of the site (a fastMRI site's ``data.root`` may come later, from ``--data``).

    Raises:
        InputError: an unknown site, unreadable YAML, or a ``prior`` that is not a string.
    """
    path = _locate(str(name_or_path))
    try:
        loaded = OmegaConf.load(path)
    except Exception:  # yaml errors come in many types: load_site names them below
        loaded = None
    if not isinstance(loaded, DictConfig):
        load_site(name_or_path, overrides)  # raises its one-line error for an unreadable or non-mapping file
    value = loaded.get("prior") if isinstance(loaded, DictConfig) else None
    for item in overrides or []:
        key, sep, _ = item.partition("=")
        if sep and key.strip() == "prior":
            value = OmegaConf.from_dotlist([item]).get("prior")
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise InputError(f"{path}: key 'prior' must be a prior name or null, got {value!r}.")
    return value, path


def _check(ok: bool, path: Path, key: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"{path}: key '{key}' must be {expected}, got {value!r}.")


def _validate(site: SiteConfig, path: Path) -> None:
    d, a, c, q, n = site.data, site.anatomy, site.coils, site.acquisition, site.noise
    _check(site.prior is None or bool(str(site.prior).strip()), path, "prior", "a prior name or null", site.prior)
    _check(d.source in ("simulated", "fastmri"), path, "data.source", "'simulated' or 'fastmri'", d.source)
    _check(q.mask_type in MASK_TYPES, path, "acquisition.mask_type", f"one of {', '.join(MASK_TYPES)}", q.mask_type)
    _check(q.acceleration > 1, path, "acquisition.acceleration", "a number > 1", q.acceleration)
    _check(0 < q.center_fraction < 1, path, "acquisition.center_fraction", "in (0, 1)", q.center_fraction)
    if d.source == "fastmri":
        if not d.root:
            raise InputError(
                f"{path}: key 'data.root' is not set, expected the folder of your fastMRI h5 files "
                f"(pass data.root=/path/to/fastmri/multicoil_val)."
            )
        root = Path(os.path.expanduser(d.root))
        if not root.is_dir():
            raise InputError(f"{path}: key 'data.root' is {d.root!r}, which is not an existing folder of fastMRI h5 files.")
        return
    _check(d.num_subjects >= 1, path, "data.num_subjects", "a positive integer", d.num_subjects)
    _check(d.slices_per_subject >= 1, path, "data.slices_per_subject", "a positive integer", d.slices_per_subject)
    _check(d.subject_seed_offset >= 0, path, "data.subject_seed_offset", "a non-negative integer", d.subject_seed_offset)
    _check(a.source in SOURCES, path, "anatomy.source", f"one of {', '.join(SOURCES)}", a.source)
    _check(a.contrast in CONTRASTS, path, "anatomy.contrast", f"one of {', '.join(CONTRASTS)}", a.contrast)
    _check(a.orientation in ORIENTATIONS, path, "anatomy.orientation", f"one of {', '.join(ORIENTATIONS)}", a.orientation)
    if a.source != "mni152":
        _check(a.contrast == "native", path, "anatomy.contrast", f"'native' for anatomy.source {a.source!r}", a.contrast)
    if a.source == "nifti":
        _check(bool(a.path) and Path(a.path).is_file(), path, "anatomy.path", "an existing NIfTI file", a.path)
    if a.source == IMAGES:
        _validate_images(site, path)
    _check(a.deformation_mm >= 0, path, "anatomy.deformation_mm", "a non-negative number", a.deformation_mm)
    _check(a.bias_field >= 0, path, "anatomy.bias_field", "a non-negative number", a.bias_field)
    _check(a.background_phase >= 0, path, "anatomy.background_phase", "a non-negative number (radians)", a.background_phase)
    _check(1 <= c.count <= 64, path, "coils.count", "an integer in [1, 64]", c.count)
    _check(c.radius >= MIN_RADIUS, path, "coils.radius", f"a number >= {MIN_RADIUS}", c.radius)
    _check(0 <= c.correlation <= 0.9, path, "coils.correlation", "in [0, 0.9]", c.correlation)
    _check(
        len(q.matrix) == 2 and all(isinstance(s, int) and 16 <= s <= 1024 for s in q.matrix),
        path, "acquisition.matrix", "two integers in [16, 1024] (H, W)", list(q.matrix),
    )
    _check(n.sigma >= 0 and math.isfinite(n.sigma), path, "noise.sigma", "a non-negative number", n.sigma)
    try:
        make_mask(q.mask_type, tuple(q.matrix), q.acceleration, q.center_fraction, 0)
    except InputError as exc:
        raise InputError(f"{path}: key 'acquisition' is not a valid mask request ({str(exc).rstrip('.')}).") from None


def _validate_images(site: SiteConfig, path: Path) -> None:
    """An image-stack site: the file reads, the splits are valid and disjoint, the chosen split exists."""
    a, d = site.anatomy, site.data
    if not a.path:
        raise InputError(f"{path}: key 'anatomy.path' is not set, expected an image stack file for anatomy.source 'images'.")
    _check(a.intensity_scale > 0 and math.isfinite(a.intensity_scale), path, "anatomy.intensity_scale",
           "a positive number", a.intensity_scale)
    try:
        stack = image_stack(site)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    if not d.splits:
        raise InputError(f"{path}: key 'data.splits' is empty, expected named index ranges such as "
                         f"{{train: ['0:10'], test: ['10:18']}} over the {len(stack)} images.")
    _check(d.split_gap >= 0, path, "data.split_gap", "a non-negative integer", d.split_gap)
    split_indices(d.splits, len(stack), str(path), d.split_gap)
    _check(d.split in d.splits, path, "data.split", f"one of {', '.join(d.splits)}", d.split)


def image_stack(site: SiteConfig) -> np.ndarray:
    """The image stack of an ``anatomy.source: images`` site (read once per process and file version),
    resliced to ``anatomy.orientation`` (:func:`~recon.data.images.reslice`: the stack as stored is axial).

    Shape: ``(N, H, W)`` complex128 or float64, read-only.

    Raises:
        InputError: naming ``anatomy.path`` and the resolved path (see :func:`recon.data.images.read_image_stack`).
    """
    return reslice(_read_stack(*_stack_file(site))[0], site.anatomy.orientation)


def _stack_file(site: SiteConfig) -> tuple[str, str | None, int]:
    file = resolve_data_path(site.anatomy.path or "")
    return str(file), site.anatomy.key, file.stat().st_mtime_ns if file.is_file() else -1


@functools.lru_cache(maxsize=4)
def _read_stack(file: str, key: str | None, stamp: int) -> tuple[np.ndarray, str]:
    """The stack and the SHA-256 of its values (simulated files record it, so a changed file is re-simulated)."""
    stack = read_image_stack(file, key)
    stack.setflags(write=False)
    return stack, hashlib.sha256(np.ascontiguousarray(stack).tobytes()).hexdigest()


def _anatomy_digest(site: SiteConfig) -> str:
    """SHA-256 of an image stack's values; "" for anatomy that ships in packages."""
    return _read_stack(*_stack_file(site))[1] if site.anatomy.source == IMAGES else ""


def _first_line(exc: BaseException) -> str:
    """The first line of an omegaconf error (its message goes on with full_key / object_type lines)."""
    text = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0].rstrip(".")


def _failing_key(schema: DictConfig, loaded: DictConfig) -> str:
    """The top-level key whose merge fails (omegaconf names no key when a section is given a scalar)."""
    for key in loaded:
        try:
            OmegaConf.merge(schema, {key: loaded[key]})
        except Exception:  # noqa: BLE001 - any merge failure identifies the key
            return str(key)
    return "?"


def load_site(name_or_path: str, overrides: list[str] | None = None) -> SiteConfig:
    """Load, override and validate a site: the one entry point for every script.

    Maths: none. Shape: none.

    Args:
        name_or_path: A site name in ``configs/sites`` (e.g. ``unseen_center``) or a ``.yaml`` path.
        overrides: omegaconf dotlist, e.g. ``["acquisition.acceleration=8", "noise.sigma=0.02"]``.

    Returns:
        The typed :class:`SiteConfig` (``name`` defaults to the file's stem).

    Raises:
        InputError: unknown site, unreadable YAML, unknown keys or wrong types in the file or the
            overrides, invalid values, or a fastMRI site whose ``data.root`` is missing.
    """
    path = _locate(str(name_or_path))
    schema = OmegaConf.structured(SiteConfig)
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        if isinstance(exc, OSError) and "loaded object type" in str(exc):  # a YAML scalar such as `42`
            raise InputError(
                f"{path}: holds a single YAML value, expected a mapping of site keys (see configs/sites/)."
            ) from None
        raise InputError(f"{path}: cannot be parsed as YAML ({type(exc).__name__}), expected a site config.") from None
    if not isinstance(loaded, DictConfig):
        raise InputError(f"{path}: holds a YAML list, expected a mapping of site keys (see configs/sites/).")
    try:
        cfg = OmegaConf.merge(schema, loaded)
    except Exception as exc:  # omegaconf validation errors and TypeErrors
        key = getattr(exc, "full_key", None) or _failing_key(schema, loaded)
        raise InputError(
            f"{path}: key '{key}' is not in the site schema or has the wrong type ({_first_line(exc)})."
        ) from None
    for item in overrides or []:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise InputError(
                f"command line: site override {item!r} is not key=value, expected e.g. acquisition.acceleration=8."
            )
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception as exc:
            detail = _first_line(exc) if isinstance(exc, OmegaConfBaseException) else type(exc).__name__
            raise InputError(
                f"{path}: override key '{key}' is unknown or has the wrong type ({detail}), "
                f"expected a site schema key like acquisition.acceleration=8."
            ) from None
    try:
        site: SiteConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # interpolations such as ${nope} resolve here
        key = getattr(exc, "full_key", None) or "?"
        raise InputError(f"{path}: key '{key}' cannot be resolved ({_first_line(exc)}).") from None
    if not site.name:
        site.name = path.stem
    site.acquisition.matrix = [int(s) for s in site.acquisition.matrix]
    if site.acquisition.center_fraction is None and site.acquisition.acceleration > 0:
        site.acquisition.center_fraction = FASTMRI_CENTER_PRODUCT / site.acquisition.acceleration
    _validate(site, path)
    return site


def subject_seed(seed: int, stream: int, index: int) -> np.random.SeedSequence:
    """Seed of one simulated subject.

    Maths: ``SeedSequence(seed, spawn_key=(stream, index))``; ``stream`` is :data:`EVAL_STREAM`
    or :data:`TRAIN_STREAM`, so training and evaluation subjects never share a seed.

    Shape: none.
    """
    return np.random.SeedSequence(int(seed), spawn_key=(int(stream), int(index)))


def _acquisition_label(site: SiteConfig) -> str:
    if site.anatomy.source == IMAGES:
        return "IMAGES"
    prefix = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}[site.anatomy.orientation]
    contrast = "EPI" if site.anatomy.source == "epi" else site.anatomy.contrast.upper()
    return f"{prefix}{contrast}"


def _require_simulated(site: SiteConfig) -> None:
    if site.data.source != "simulated":
        raise InputError(
            f"site {site.name}: key 'data.source' is {site.data.source!r}, expected 'simulated' (fastMRI sites read data.root)."
        )


@dataclass(frozen=True, eq=False)
class _Volume:
    images: np.ndarray  # (S, H, W) complex128 noiseless images
    clean: torch.Tensor  # (S, C, H, W) complex64 noiseless k-space
    scales: np.ndarray  # (S,) normalisation scales of the noiseless k-space


def _simulate_subject(site: SiteConfig, seq: np.random.SeedSequence, fractions: np.ndarray | None, count: int,
                      maps: torch.Tensor) -> tuple[_Volume, np.random.Generator]:
    """Noiseless complex images and coil k-space of one subject; returns the noise generator too."""
    warp_seq, phase_seq, slice_seq, noise_seq = seq.spawn(4)
    a = site.anatomy
    anatomy = load_anatomy(a.source, a.path)
    subject = random_subject(np.random.default_rng(warp_seq), anatomy, a.deformation_mm, a.bias_field)
    if fractions is None:  # training subjects: random positions within the slice range
        fractions = np.random.default_rng(slice_seq).uniform(0.0, 1.0, size=count)
    matrix = tuple(site.acquisition.matrix)
    offsets = slice_offsets_mm(anatomy, a.orientation, fractions)
    phase_rng = np.random.default_rng(phase_seq)
    images = np.stack([
        render_slice(anatomy, subject, a.contrast, a.orientation, float(off), matrix)
        * np.exp(1j * background_phase(phase_rng, matrix, a.background_phase))
        for off in offsets
    ])
    return _volume(site, images, maps), np.random.default_rng(noise_seq)


def _volume(site: SiteConfig, images: np.ndarray, maps: torch.Tensor) -> _Volume:
    """Coil k-space and normalisation scales of noiseless complex images ``(S, H, W)``."""
    x = torch.from_numpy(images.astype(np.complex64))
    clean = fft2c(maps.unsqueeze(0) * x.unsqueeze(1))
    scales = np.array([normalization_scale(k, None, source=f"site {site.name}") for k in clean])
    return _Volume(images, clean, scales)


def _stack_slices(site: SiteConfig, indices: list[int], phases: list[np.random.Generator]) -> np.ndarray:
    """Slices of the image stack at the site's matrix (crop / zero-pad, times ``intensity_scale``):
    complex slices keep their own phase; magnitude slices get a smooth background phase, one
    generator each (:func:`~recon.data.anatomy.background_phase`).

    Shape: returns ``(len(indices), H, W)`` complex128.
    """
    stack, a = image_stack(site), site.anatomy
    matrix = tuple(site.acquisition.matrix)
    x = fit_matrix(np.asarray(stack[indices]), matrix) * a.intensity_scale
    if np.iscomplexobj(stack):
        return x.astype(np.complex128)
    return np.stack([xi * np.exp(1j * background_phase(rng, matrix, a.background_phase)) for xi, rng in zip(x, phases)])


def _eval_files(site: SiteConfig) -> list[tuple[int, list[int] | None]]:
    """The evaluation files: ``(index, stack indices)`` — simulated anatomy: subject indices (no stack);
    image stacks: consecutive groups of ``slices_per_subject`` slices of ``data.split``, named by the first."""
    d = site.data
    if site.anatomy.source != IMAGES:
        return [(d.subject_seed_offset + i, None) for i in range(d.num_subjects)]
    indices = split_indices(d.splits, len(image_stack(site)), site.name, d.split_gap)[d.split]
    n = d.slices_per_subject
    return [(indices[i], indices[i:i + n]) for i in range(0, len(indices), n)]


def _eval_volume(site: SiteConfig, seed: int, index: int, stack_indices: list[int] | None,
                 maps: torch.Tensor) -> tuple[_Volume, np.random.Generator]:
    """One evaluation file's noiseless volume and its noise generator."""
    seq = subject_seed(seed, EVAL_STREAM, index)
    if stack_indices is None:
        count = site.data.slices_per_subject
        return _simulate_subject(site, seq, _eval_fractions(count), count, maps)
    phase_seq, noise_seq = seq.spawn(2)
    phases = [np.random.default_rng(s) for s in phase_seq.spawn(len(stack_indices))]
    return _volume(site, _stack_slices(site, stack_indices, phases), maps), np.random.default_rng(noise_seq)


def _eval_fractions(count: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, count) if count > 1 else np.array([0.5])


def _site_maps(site: SiteConfig) -> torch.Tensor:
    c = site.coils
    return torch.from_numpy(birdcage_sens_maps(c.count, tuple(site.acquisition.matrix), c.radius, c.rotation_deg))


def simulate_site(
    site: SiteConfig,
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    prospective: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write a folder of fastMRI-format multi-coil volumes for a simulated site.

    Maths: ``y_c = fft2c(S_c x) + n_c``, ``n ~ CN(0, σ_raw² Ψ)`` across coils; target
    ``rss(ifft2c(y))``. With ``prospective=True`` the stored k-space is ``M ⊙ y`` (zeros where
    not sampled, mask of :func:`~recon.data.slice_mask_seed` with ``acquisition.mask_seed``) and
    no ``mask`` dataset, as a scanner's undersampled file.

    Shape: each file ``kspace`` ``(slices_per_subject, coils, H, W)`` complex64.

    Args:
        site: A simulated site (:func:`load_site`).
        out_dir: Output folder (created when needed).
        seed: Base seed; the same seed gives byte-identical files.
        prospective: Store undersampled k-space.
        overwrite: Replace existing files of the same names.

    Returns:
        The written paths, one per subject (``{site.name}_{index:03d}.h5``).

    Raises:
        InputError: a fastMRI site, or existing output files without ``overwrite`` — checked
            before anything is written.
    """
    _require_simulated(site)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: key 'out' is a file, expected an output folder.")
    files = _eval_files(site)
    paths = [out_dir / f"{site.name}_{index:03d}.h5" for index, _ in files]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]}: key 'out' already holds this file, expected a new folder or --overwrite.")
    acq = site.acquisition
    matrix = tuple(acq.matrix)
    maps = _site_maps(site)
    covariance = coil_noise_covariance(site.coils.count, site.coils.correlation)
    # image stacks carry no geometry: 1 mm pixels
    spacing = 1.0 if site.anatomy.source == IMAGES else load_anatomy(site.anatomy.source, site.anatomy.path).fov_mm / min(matrix)
    header = ismrmrd_header(matrix, matrix, (matrix[0] * spacing, matrix[1] * spacing, 5.0))
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(site))
    volumes = []  # simulate everything first: a failure leaves the folder untouched
    for (index, stack_indices), path in zip(files, paths):
        volume, noise_rng = _eval_volume(site, seed, index, stack_indices, maps)
        sigma_raw = float(site.noise.sigma * np.median(volume.scales))
        noise = torch.from_numpy(complex_noise(noise_rng, tuple(volume.clean.shape), sigma_raw, covariance))
        kspace = volume.clean + noise
        target = rss(ifft2c(kspace), dim=1).numpy()
        reference = rss(ifft2c(volume.clean), dim=1).numpy()
        if prospective:
            masks = torch.stack([
                make_mask(acq.mask_type, matrix, acq.acceleration, acq.center_fraction,
                          slice_mask_seed(acq.mask_seed, path.name, s))[0]
                for s in range(kspace.shape[0])
            ])
            kspace = kspace * masks.unsqueeze(1)
        attrs = {
            "acquisition": _acquisition_label(site),
            "max": float(target.max()),
            "norm": float(np.linalg.norm(target)),
            "noise_sigma": sigma_raw,
            "site": site.name,
            "seed": int(seed),
            "subject": int(index),
            "site_config": config_yaml,
        }
        if stack_indices is not None:
            attrs["stack_indices"] = np.asarray(stack_indices, dtype=np.int64)
            attrs["anatomy_sha256"] = _anatomy_digest(site)
        volumes.append((path, kspace.numpy(), target, reference, attrs))
    out_dir.mkdir(parents=True, exist_ok=True)
    stacked_maps = maps.numpy()[None]
    return [
        write_kspace_volume(
            path, kspace, target=target, sens_maps=np.broadcast_to(stacked_maps, kspace.shape), header=header,
            attrs=attrs, reference=reference,
        )
        for path, kspace, target, reference, attrs in volumes
    ]


def site_dataset(site: SiteConfig, workdir: str | os.PathLike | None = None, seed: int = 0) -> FastMRISliceDataset:
    """The Samples of a site: its fastMRI folder, or its simulated folder (simulated on first use).

    Maths: the site's mask (``acquisition``) applied retrospectively to fully sampled slices.

    Shape: items are :class:`~recon.data.Sample` with ``kspace`` ``(C, H, W)``.

    Args:
        site: A loaded site.
        workdir: For simulated sites, the folder under which ``{name}-seed{seed}`` is kept; files
            whose stored ``site_config`` differs from ``site`` are simulated again.
        seed: Simulation seed.

    Raises:
        InputError: a simulated site without ``workdir``, or any reader error.
    """
    acq = site.acquisition
    kwargs = dict(mask_type=acq.mask_type, acceleration=acq.acceleration, center_fraction=acq.center_fraction,
                  mask_seed=acq.mask_seed)
    if site.data.source == "fastmri":
        return FastMRISliceDataset(os.path.expanduser(site.data.root), **kwargs)
    if workdir is None:
        raise InputError(f"site {site.name}: key 'workdir' is missing, expected a folder for the simulated files.")
    folder = Path(workdir) / f"{site.name}-seed{seed}"
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(site))
    expected = [folder / f"{site.name}_{index:03d}.h5" for index, _ in _eval_files(site)]

    def current(p: Path) -> bool:
        if not p.is_file():
            return False
        with h5py.File(p, "r") as hf:
            return (hf.attrs.get("site_config") == config_yaml and int(hf.attrs.get("seed", -1)) == seed
                    and hf.attrs.get("anatomy_sha256", "") == _anatomy_digest(site))
    if not all(current(p) for p in expected):
        simulate_site(site, folder, seed, overwrite=True)
    return FastMRISliceDataset(expected, **kwargs)


def training_images(site: SiteConfig, num_slices: int | None = None, seed: int = 0, split: str = "train",
                    copies: int = 1) -> torch.Tensor:
    """Noiseless complex training images of a simulated site, each normalised like a Sample.

    Maths: ``x_i / scale_i``, ``scale_i = normalization_scale(fft2c(S x_i), ones)`` with the
    site's coil maps. Simulated anatomy: ``x_i`` includes warp, bias field and background phase;
    training subject ``j`` (:data:`TRAIN_STREAM`) gives :data:`TRAINING_SLICES_PER_SUBJECT` slices
    at random positions of the site's slice range. Image stacks: every slice of ``split``, ``copies``
    times — a magnitude slice with a fresh smooth background phase per copy, a complex slice with its
    own phase times ``exp(iφ₀)``, ``φ₀ ~ U(−π, π)`` (the global phase of an MR image is arbitrary);
    copy ``r`` of slice ``k`` is seeded by ``(TRAIN_STREAM, k, r)``.

    Shape: returns ``(N, 1, H, W)`` complex64: ``N = num_slices`` (default 256) for simulated anatomy,
    ``N = copies · len(split)`` for image stacks (slice-major).

    Raises:
        InputError: a fastMRI site, ``num_slices < 1``, ``copies < 1``, ``num_slices`` given for an image
            stack, or an unknown split.
    """
    _require_simulated(site)
    maps = _site_maps(site)
    if site.anatomy.source == IMAGES:
        if num_slices is not None:
            raise InputError(f"site {site.name}: key 'num_slices' must be null for an image stack, which trains on "
                             f"every slice of its split (times 'copies').")
        if copies < 1:
            raise InputError(f"site {site.name}: key 'copies' must be a positive integer, got {copies}.")
        splits = split_indices(site.data.splits, len(image_stack(site)), site.name, site.data.split_gap)
        if split not in splits:
            raise InputError(f"site {site.name}: key 'data.split' is {split!r}, expected one of {', '.join(splits)}.")
        indices = [k for k in splits[split] for _ in range(copies)]
        seqs = [np.random.SeedSequence(int(seed), spawn_key=(TRAIN_STREAM, k, r))
                for k in splits[split] for r in range(copies)]
        phase_rngs = [np.random.default_rng(q.spawn(1)[0]) for q in seqs]
        images = _stack_slices(site, indices, phase_rngs)
        if np.iscomplexobj(image_stack(site)):
            turns = np.array([np.random.default_rng(q).uniform(-math.pi, math.pi) for q in seqs])
            images = images * np.exp(1j * turns)[:, None, None]
        out = []
        for start in range(0, len(images), 16):  # bounded memory for large stacks
            volume = _volume(site, images[start:start + 16], maps)
            out.append(volume.images / volume.scales[:, None, None])
        return torch.from_numpy(np.concatenate(out).astype(np.complex64)).unsqueeze(1)
    total = DEFAULT_TRAINING_SLICES if num_slices is None else int(num_slices)
    if total < 1:
        raise InputError(f"site {site.name}: key 'num_slices' must be a positive integer, got {num_slices}.")
    out = []
    done, subject = 0, 0
    while done < total:
        count = min(TRAINING_SLICES_PER_SUBJECT, total - done)
        volume, _ = _simulate_subject(site, subject_seed(seed, TRAIN_STREAM, subject), None, count, maps)
        out.append(volume.images / volume.scales[:, None, None])
        done += count
        subject += 1
    return torch.from_numpy(np.concatenate(out).astype(np.complex64)).unsqueeze(1)
