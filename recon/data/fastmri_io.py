"""fastMRI h5 files in and out.

Reading: :class:`FastMRISliceDataset` turns a folder of fastMRI-format h5 files (multi-coil
``kspace`` ``(slices, coils, H, W)`` or single-coil ``(slices, H, W)``; optional ``mask``,
``reconstruction_rss`` / ``reconstruction_esc``, ``sens_maps``, ``ismrmrd_header``; attributes
``acquisition``, ``max``, ``norm``, ``noise_sigma``) into normalised :class:`~recon.data.Sample`\\ s.
Simulated files also hold ``reconstruction_clean`` (:data:`REFERENCE_KEY`): the magnitude of the
image before simulated noise, so results can be scored against the clean reference as well as
against fastMRI's target (the RSS of the noisy fully sampled data).

* Fully sampled files (every encoded k-space entry measured) are undersampled retrospectively
  with the dataset's mask, seeded per file and slice (:func:`slice_mask_seed`).
* Prospectively undersampled files keep their own mask: the ``mask`` dataset when present,
  otherwise the entries that are zero on every coil.

Hostile files: :func:`read_volume_info` checks a file's structure (HDF5 readable, every key a
dataset of the right dtype and shape, sizes within :data:`MAX_SLICES`, :data:`MAX_COILS`,
:data:`MIN_MATRIX` to :data:`MAX_MATRIX` and :data:`MAX_SLICE_ENTRIES`, attributes ``max`` /
``noise_sigma`` finite and non-negative) when the dataset is opened; values (NaN/Inf, all-zero
k-space) are checked when a slice is read. Every problem, including HDF5 errors of a corrupted
file, is an :class:`~recon.errors.InputError` naming the file and the key.

Writing: :func:`write_reconstructions` writes fastMRI's submission format (one h5 per input file,
same name, dataset ``reconstruction``), atomically; :func:`write_kspace_volume` writes fastMRI
input files (used by the site simulator). Both go through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import contextlib
import math
import os
import xml.etree.ElementTree as etree
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from recon.data.normalize import BOX_FRACTION
from recon.data.sample import Sample, check_kspace, check_mask_2d, infer_mask, sample_from_kspace
from recon.errors import InputError
from recon.masks import make_mask

__all__ = [
    "FastMRISliceDataset",
    "VolumeInfo",
    "FULLY_SAMPLED_FRACTION",
    "MIN_MATRIX",
    "MAX_MATRIX",
    "MAX_COILS",
    "MAX_SLICES",
    "MAX_SLICE_ENTRIES",
    "slice_mask_seed",
    "read_volume_info",
    "ismrmrd_header",
    "write_kspace_volume",
    "write_reconstructions",
    "atomic_h5",
    "REFERENCE_KEY",
]

REFERENCE_KEY = "reconstruction_clean"
"""Dataset of the clean reference ``(slices, H, W)`` float32: RSS of the noiseless coil images."""

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"

FULLY_SAMPLED_FRACTION = 0.99
"""A slice counts as fully sampled when at least this fraction of its encoded entries is non-zero
(isolated exact zeros in measured data do not turn a file into an undersampled one)."""

MIN_MATRIX = 8
"""Smallest k-space side H, W (the normalisation's central 8 % box needs at least one line)."""
MAX_MATRIX = 8192
"""Largest k-space (and target) side H, W."""
MAX_COILS = 256
"""Largest number of coils."""
MAX_SLICES = 100_000
"""Largest number of slices in one file."""
MAX_SLICE_ENTRIES = 2**27
"""Largest ``coils · H · W`` of one slice (1 GiB of complex64); fastMRI's largest slices hold about 5 · 10⁶."""

_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)
"""What h5py raises on a corrupted file (bad superblock, object headers, heaps, chunks or filters)."""


def _h5_reason(exc: BaseException) -> str:
    """The first line of an h5py error, without the quotes a KeyError adds."""
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return (text.strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _dataset(hf: h5py.File, key: str, path: Path) -> h5py.Dataset | None:
    """``hf[key]`` if present; an HDF5 group (or other object) under a known key is an error."""
    if key not in hf:
        return None
    obj = hf[key]
    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{path}: key '{key}' is an HDF5 {type(obj).__name__.lower()}, expected a dataset.")
    return obj


def _size_problem(slices: int, coils: int, height: int, width: int) -> str | None:
    """What is wrong with a k-space shape (too small or absurdly large to read), or ``None``."""
    if not 1 <= coils <= MAX_COILS:
        return f"{coils} coils, expected 1 to {MAX_COILS}"
    if min(height, width) < MIN_MATRIX or max(height, width) > MAX_MATRIX:
        return f"a {height} x {width} matrix, expected H and W in [{MIN_MATRIX}, {MAX_MATRIX}]"
    if coils * height * width > MAX_SLICE_ENTRIES:
        return f"{coils * height * width} entries per slice, expected at most {MAX_SLICE_ENTRIES} (coils x H x W)"
    if slices > MAX_SLICES:
        return f"{slices} slices, expected at most {MAX_SLICES}"
    return None


def _attribute(attrs: dict, key: str, path: Path) -> None:
    """Check a numeric attribute used by the reader (``max``, ``noise_sigma``): a finite scalar >= 0."""
    if key not in attrs:
        return
    value = np.asarray(attrs[key])
    ok = value.size == 1 and value.dtype.kind in "fiu"
    if ok:
        number = float(value.reshape(()))
        ok = math.isfinite(number) and number >= 0
    if not ok:
        shown = repr(value.reshape(()).item()) if value.size == 1 else f"an array of shape {value.shape}"
        raise InputError(f"{path}: attribute '{key}' is {shown}, expected a finite non-negative number.")


def slice_mask_seed(base_seed: int, fname: str, slice_idx: int) -> int:
    """Seed of the retrospective mask of one slice, stable across processes and platforms.

    Maths: ``SeedSequence([base_seed, crc32(fname), slice_idx])`` → one 31-bit integer.

    Shape: scalars in, ``int`` out.
    """
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, zlib.crc32(str(fname).encode()), int(slice_idx)])
    return int(state.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open a temporary h5 file next to ``path`` for writing; rename it onto ``path`` on success.

    Maths: none. Shape: none. On any exception the temporary file is removed and ``path`` is
    left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as hf:
            yield hf
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _et_text(root: etree.Element, names: Sequence[str]) -> str | None:
    query = ".//" + "/".join(f"{{{ISMRMRD_NAMESPACE}}}{n}" for n in names)
    node = root.find(query)
    return None if node is None else node.text


def ismrmrd_header(
    matrix: tuple[int, int],
    recon_matrix: tuple[int, int] | None = None,
    fov_mm: tuple[float, float, float] = (230.0, 230.0, 5.0),
) -> bytes:
    """Minimal ISMRMRD XML header that fastMRI's ``SliceDataset`` parses.

    Maths: ``kspace_encoding_step_1``: ``center = W // 2``, ``maximum = W - 1`` (no padding).

    Shape: ``matrix`` ``(H, W)`` of k-space (x = H readout, y = W phase encoding).
    """
    height, width = (int(s) for s in matrix)
    rh, rw = (int(s) for s in (recon_matrix or matrix))
    fx, fy, fz = (float(f) for f in fov_mm)

    def space(tag: str, x: int, y: int) -> str:
        return (
            f"<{tag}><matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"
            f"<fieldOfView_mm><x>{fx:.3f}</x><y>{fy:.3f}</y><z>{fz:.3f}</z></fieldOfView_mm></{tag}>"
        )

    xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<ismrmrdHeader xmlns="{ISMRMRD_NAMESPACE}"><encoding>'
        + space("encodedSpace", height, width)
        + space("reconSpace", rh, rw)
        + "<encodingLimits><kspace_encoding_step_1>"
        f"<minimum>0</minimum><maximum>{width - 1}</maximum><center>{width // 2}</center>"
        "</kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>"
    )
    return xml.encode("utf-8")


@dataclass(frozen=True)
class VolumeInfo:
    """What :class:`FastMRISliceDataset` needs to know about one file before reading slices.

    Shape: ``kspace_shape`` ``(slices, coils, H, W)`` (single-coil files report ``coils = 1``);
    ``encoded`` ``(W,)`` float32 1 on the encoded phase-encoding columns; ``recon_size`` the
    header's ``reconSpace`` matrix ``(x, y)`` (fastMRI crops reconstructions to it), or ``None``;
    ``has_reference``: the file holds the clean reference :data:`REFERENCE_KEY` (simulated files).
    """

    path: Path
    kspace_shape: tuple[int, int, int, int]
    multicoil: bool
    target_key: str | None
    has_mask: bool
    has_sens_maps: bool
    encoded: torch.Tensor
    recon_size: tuple[int, int] | None
    attrs: dict
    has_reference: bool = False


def _header(hf: h5py.File, path: Path, width: int) -> tuple[int, int, tuple[int, int] | None]:
    """Encoded columns ``[left, right)`` and the recon matrix ``(x, y)`` from the ISMRMRD header."""
    if "ismrmrd_header" not in hf:
        return 0, width, None
    try:
        root = etree.fromstring(hf["ismrmrd_header"][()])
        enc_y = _et_text(root, ["encoding", "encodedSpace", "matrixSize", "y"])
        center = _et_text(root, ["encoding", "encodingLimits", "kspace_encoding_step_1", "center"])
        maximum = _et_text(root, ["encoding", "encodingLimits", "kspace_encoding_step_1", "maximum"])
        rec_x = _et_text(root, ["encoding", "reconSpace", "matrixSize", "x"])
        rec_y = _et_text(root, ["encoding", "reconSpace", "matrixSize", "y"])
        recon_size = (int(rec_x), int(rec_y)) if rec_x is not None and rec_y is not None else None
        if enc_y is None or center is None or maximum is None:
            return 0, width, recon_size
        left = int(enc_y) // 2 - int(center)
        right = left + int(maximum) + 1
    except (etree.ParseError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: key 'ismrmrd_header' is not valid ISMRMRD XML with integer sizes ({exc}).") from None
    if recon_size is not None and not all(1 <= s <= MAX_MATRIX for s in recon_size):
        raise InputError(
            f"{path}: key 'ismrmrd_header' has reconSpace matrix {recon_size}, expected sizes in [1, {MAX_MATRIX}]."
        )
    if not 0 <= left < right:
        return 0, width, recon_size
    if left >= width:
        raise InputError(
            f"{path}: key 'ismrmrd_header' encodes phase-encoding columns [{left}, {right}), outside the k-space "
            f"width {width}; expected encodingLimits that overlap the k-space matrix."
        )
    return left, min(right, width), recon_size


def _inspect(hf: h5py.File, path: Path, where: list[str]) -> VolumeInfo:
    """The checks of :func:`read_volume_info` on an open file; ``where[0]`` tracks the key being read."""
    dset = _dataset(hf, "kspace", path)
    if dset is None:
        raise InputError(f"{path}: key 'kspace' is missing, expected complex k-space of shape (slices, coils, H, W).")
    if dset.dtype.kind != "c":
        raise InputError(f"{path}: key 'kspace' must be complex (complex64), got dtype {dset.dtype}.")
    if dset.ndim not in (3, 4):
        raise InputError(
            f"{path}: key 'kspace' must have rank 4 (slices, coils, H, W) or 3 (slices, H, W), got shape {dset.shape}."
        )
    multicoil = dset.ndim == 4
    shape = tuple(int(s) for s in dset.shape) if multicoil else (dset.shape[0], 1, dset.shape[1], dset.shape[2])
    slices, coils, height, width = shape
    if slices < 1:
        raise InputError(f"{path}: key 'kspace' holds no slices, expected shape (slices, coils, H, W) with slices >= 1.")
    problem = _size_problem(slices, coils, height, width)
    if problem:
        raise InputError(f"{path}: key 'kspace' of shape {tuple(dset.shape)} has {problem}.")

    where[0] = "mask"
    mask = _dataset(hf, "mask", path)
    if mask is not None:
        if mask.ndim > 3 or mask.size > coils * height * width:  # do not read an absurdly large mask
            raise InputError(
                f"{path}: key 'mask' of shape {mask.shape} does not fit k-space of shape {tuple(dset.shape)}, "
                f"expected (W,), (H, W) or (coils, H, W)."
            )
        check_mask_2d(np.asarray(mask), (coils, height, width), str(path))

    where[0] = "sens_maps"
    maps = _dataset(hf, "sens_maps", path)
    if maps is not None:
        expected = shape if multicoil else (slices, height, width)
        if maps.dtype.kind != "c" or tuple(maps.shape) not in (expected, shape):
            raise InputError(
                f"{path}: key 'sens_maps' must be complex of the k-space shape {tuple(dset.shape)}, "
                f"got {maps.dtype} of shape {maps.shape}."
            )

    keys = ["reconstruction_rss", "reconstruction_esc"] if multicoil else ["reconstruction_esc", "reconstruction_rss"]
    where[0] = keys[0]
    target_key = next((k for k in keys if k in hf), None)
    has_reference = REFERENCE_KEY in hf
    for key in ([target_key] if target_key else []) + ([REFERENCE_KEY] if has_reference else []):
        where[0] = key
        target = _dataset(hf, key, path)
        if (target.dtype.kind not in "fiu" or target.ndim != 3 or target.shape[0] != slices
                or not all(1 <= s <= MAX_MATRIX for s in target.shape[1:])):
            raise InputError(
                f"{path}: key '{key}' must be a real volume of shape ({slices}, H, W) with H and W in "
                f"[1, {MAX_MATRIX}], got {target.dtype} of shape {target.shape}."
            )

    where[0] = "ismrmrd_header"
    if "ismrmrd_header" in hf:
        _dataset(hf, "ismrmrd_header", path)
    left, right, recon_size = _header(hf, path, width)
    encoded = torch.zeros(width, dtype=torch.float32)
    encoded[left:right] = 1

    where[0] = "attributes"  # named as "key 'attributes'" if h5py cannot read them
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in hf.attrs.items()}
    for name in ("max", "noise_sigma"):
        _attribute(attrs, name, path)
    return VolumeInfo(path, shape, multicoil, target_key, mask is not None, maps is not None, encoded, recon_size,
                      attrs, has_reference)


def read_volume_info(path: str | os.PathLike) -> VolumeInfo:
    """Open a fastMRI h5 file and check its structure: keys, dtypes, shapes, sizes, attributes
    (values are checked per slice, by :meth:`FastMRISliceDataset.__getitem__`).

    Maths: none. Shape: see :class:`VolumeInfo`.

    Raises:
        InputError: missing file, a file HDF5 cannot open or read (not HDF5, truncated, corrupted),
            a missing ``kspace`` key or a known key that is not a dataset, k-space not complex or of
            rank other than 3/4, sizes outside the limits (:data:`MAX_MATRIX` ...), a ``mask`` that does
            not broadcast or samples nothing, ``sens_maps`` or target not matching the k-space, an
            invalid ``ismrmrd_header``, attributes ``max`` / ``noise_sigma`` not finite non-negative numbers.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "file not found"
        raise InputError(f"{path}: {what}, expected a fastMRI h5 file with key 'kspace'.")
    try:
        hf = h5py.File(path, "r")
    except _H5_ERRORS as exc:
        raise InputError(
            f"{path}: cannot be opened as HDF5 ({_h5_reason(exc)}), expected a fastMRI h5 file with key 'kspace'."
        ) from None
    where = ["kspace"]
    try:
        with hf:
            return _inspect(hf, path, where)
    except InputError:
        raise
    except _H5_ERRORS as exc:
        raise InputError(
            f"{path}: key '{where[0]}' cannot be read ({_h5_reason(exc)}), expected an intact fastMRI h5 file "
            f"(the file is corrupted or truncated)."
        ) from None


class FastMRISliceDataset(Dataset):
    """Slices of a folder of fastMRI h5 files as normalised :class:`~recon.data.Sample`\\ s.

    Maths: fully sampled slice → ``M = make_mask(mask_type, (H, W), R, c, seed(file, slice)) ⊙ E``
    (``E`` the encoded columns; ``M = E`` when ``mask_type`` is ``None``); undersampled slice →
    its own mask; then ``kspace = M ⊙ y / scale`` (:func:`~recon.data.sample_from_kspace`).

    Shape: item ``i`` is one slice, ``Sample.kspace`` ``(C, H, W)`` complex64.

    Args:
        root: A folder of ``*.h5`` files, one h5 file, or a list of h5 files.
        mask_type: Retrospective mask type for fully sampled files (:func:`recon.masks.make_mask`),
            or ``None`` to keep them fully sampled.
        acceleration: Retrospective acceleration ``R``.
        center_fraction: Fully sampled centre fraction of the retrospective mask.
        mask_seed: Base seed of the per-slice masks.
        box_fraction: Centre box of the normalisation scale.

    Raises:
        InputError: no such folder or file, no h5 files, or any check of :func:`read_volume_info`.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        mask_type: str | None = None,
        acceleration: float = 4.0,
        center_fraction: float = 0.08,
        mask_seed: int = 0,
        box_fraction: float = BOX_FRACTION,
    ) -> None:
        if isinstance(root, (str, os.PathLike)):
            root = Path(root)
            if root.is_dir():
                files = sorted(p for p in root.iterdir() if p.suffix == ".h5" and not p.name.startswith("."))
                if not files:
                    raise InputError(f"{root}: folder holds no .h5 files, expected fastMRI h5 files with key 'kspace'.")
            elif root.exists():
                files = [root]
            else:
                raise InputError(f"{root}: no such file or folder, expected fastMRI h5 files with key 'kspace'.")
        else:
            files = [Path(p) for p in root]
            if not files:
                raise InputError("root: the list of files is empty, expected fastMRI h5 files with key 'kspace'.")
        self.mask_type = mask_type
        self.acceleration = float(acceleration)
        self.center_fraction = float(center_fraction)
        self.mask_seed = int(mask_seed)
        self.box_fraction = float(box_fraction)
        self.volumes: list[VolumeInfo] = [read_volume_info(p) for p in files]
        if mask_type is not None:  # fail on a bad mask request now, not at the first fully sampled slice
            first = self.volumes[0]
            try:
                make_mask(mask_type, first.kspace_shape[-2:], self.acceleration, self.center_fraction, 0)
            except InputError as exc:
                raise InputError(
                    f"{first.path}: key 'kspace' of shape {first.kspace_shape} cannot take the requested mask "
                    f"({str(exc).rstrip('.')})."
                ) from None
        self.index: list[tuple[int, int]] = [
            (v, s) for v, info in enumerate(self.volumes) for s in range(info.kspace_shape[0])
        ]

    @property
    def files(self) -> list[Path]:
        """The h5 files, in item order."""
        return [info.path for info in self.volumes]

    def __len__(self) -> int:
        return len(self.index)

    def slices_of(self, fname: str) -> list[int]:
        """Item indices of the slices of one file (by name), in slice order."""
        return [i for i, (v, _) in enumerate(self.index) if self.volumes[v].path.name == fname]

    def retrospective_mask(self, info: VolumeInfo, slice_idx: int) -> torch.Tensor:
        """Mask applied to a fully sampled slice.

        Maths: ``M = make_mask(...) ⊙ E`` (``E`` if ``mask_type`` is ``None``).

        Shape: ``(H, W)`` float32.
        """
        height, width = info.kspace_shape[-2:]
        encoded = info.encoded.expand(height, width)
        if self.mask_type is None:
            return encoded.contiguous()
        seed = slice_mask_seed(self.mask_seed, info.path.name, slice_idx)
        mask, _ = make_mask(self.mask_type, (height, width), self.acceleration, self.center_fraction, seed)
        return (mask * encoded).contiguous()

    def __getitem__(self, i: int) -> Sample:
        vol, slice_idx = self.index[i]
        info = self.volumes[vol]
        source = f"{info.path} (slice {slice_idx})"
        key = "kspace"
        try:
            with h5py.File(info.path, "r") as hf:
                kspace = np.asarray(hf["kspace"][slice_idx])
                key = "mask"
                file_mask = np.asarray(hf["mask"]) if info.has_mask else None
                key = str(info.target_key)
                target = np.asarray(hf[info.target_key][slice_idx]) if info.target_key else None
                key = REFERENCE_KEY
                reference = np.asarray(hf[REFERENCE_KEY][slice_idx]) if info.has_reference else None
                key = "sens_maps"
                maps = None
                if info.has_sens_maps:
                    maps = torch.from_numpy(np.asarray(hf["sens_maps"][slice_idx]))
                    if maps.dim() == 2:
                        maps = maps.unsqueeze(0)
        except _H5_ERRORS as exc:
            raise InputError(
                f"{source}: key '{key}' cannot be read ({_h5_reason(exc)}), expected an intact fastMRI h5 file "
                f"(the file is corrupted, truncated or changed since it was opened)."
            ) from None
        kspace = check_kspace(kspace if info.multicoil else kspace[None], source)  # NaN / Inf, naming the path
        for key, image in ((info.target_key, target), (REFERENCE_KEY, reference)):
            if image is not None and not np.isfinite(image).all():
                raise InputError(f"{source}: key '{key}' contains NaN or Inf values, expected a finite magnitude image.")
        if maps is not None and not bool(torch.isfinite(torch.view_as_real(maps)).all()):
            raise InputError(f"{source}: key 'sens_maps' contains NaN or Inf values, expected finite sensitivity maps.")
        if file_mask is not None:
            mask = check_mask_2d(file_mask, tuple(kspace.shape), str(info.path))
        else:
            measured = infer_mask(kspace)
            columns = info.encoded.bool()
            fraction = float(measured[:, columns].mean()) if bool(columns.any()) else 0.0
            if fraction >= FULLY_SAMPLED_FRACTION:
                mask = self.retrospective_mask(info, slice_idx)
            elif fraction == 0.0:
                raise InputError(f"{source}: key 'kspace' is all zero, expected measured k-space.")
            else:
                mask = measured
        attrs = info.attrs
        return sample_from_kspace(
            kspace,
            fname=info.path.name,
            slice_idx=slice_idx,
            mask=mask,
            target=target,
            sens_maps=maps,
            acquisition=str(attrs.get("acquisition", "")),
            max_value=attrs.get("max"),
            noise_sigma=attrs.get("noise_sigma"),
            box_fraction=self.box_fraction,
            reference=reference,
        )


def write_kspace_volume(
    path: str | os.PathLike,
    kspace: np.ndarray,
    *,
    target: np.ndarray | None = None,
    sens_maps: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    header: bytes | None = None,
    attrs: dict | None = None,
    reference: np.ndarray | None = None,
) -> Path:
    """Write one fastMRI-format multi-coil input file atomically and reproducibly.

    Maths: none. Datasets are written without timestamps, so equal inputs give equal bytes.

    Shape: ``kspace`` ``(slices, coils, H, W)`` complex64; ``target`` ``(slices, H, W)`` float32
    (stored as ``reconstruction_rss``); ``reference`` ``(slices, H, W)`` float32 (the clean reference,
    stored as :data:`REFERENCE_KEY`); ``sens_maps`` like ``kspace``; ``mask`` ``(W,)`` or ``(H, W)``.

    Returns:
        The written path.
    """
    path = Path(path)
    with atomic_h5(path) as hf:
        hf.create_dataset("kspace", data=np.ascontiguousarray(kspace, dtype=np.complex64), track_times=False)
        if target is not None:
            hf.create_dataset("reconstruction_rss", data=np.ascontiguousarray(target, dtype=np.float32), track_times=False)
        if reference is not None:
            hf.create_dataset(REFERENCE_KEY, data=np.ascontiguousarray(reference, dtype=np.float32), track_times=False)
        if sens_maps is not None:
            hf.create_dataset("sens_maps", data=np.ascontiguousarray(sens_maps, dtype=np.complex64), track_times=False)
        if mask is not None:
            hf.create_dataset("mask", data=np.ascontiguousarray(mask), track_times=False)
        if header is not None:
            hf.create_dataset("ismrmrd_header", data=np.bytes_(header), track_times=False)
        for key, value in (attrs or {}).items():
            hf.attrs[key] = value
    return path


def write_reconstructions(
    out_dir: str | os.PathLike, fname: str, volume: torch.Tensor | np.ndarray
) -> Path:
    """Write one reconstructed volume in fastMRI's submission format, atomically.

    Maths: none (the caller brings the volume to the raw scale with ``Sample.denormalize``).

    Shape: ``volume`` ``(slices, H, W)`` real (stored float32 as dataset ``reconstruction``).

    Args:
        out_dir: Output folder (created if needed).
        fname: Input file name; the output has the same name.
        volume: Magnitude reconstructions of all slices of that file.

    Returns:
        The written path.

    Raises:
        InputError: bad volume, a name with a folder, or an output path that is an input file
            (an existing h5 file with a ``kspace`` key).
    """
    out_dir = Path(out_dir)
    name = Path(fname).name
    if not name or name != str(fname):
        raise InputError(f"{fname}: key 'fname' must be a bare file name like file1000.h5, got a path.")
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    volume = np.asarray(volume)
    if volume.dtype.kind not in "fiu" or volume.ndim != 3:
        raise InputError(
            f"{name}: key 'reconstruction' must be a real volume of shape (slices, H, W), got {volume.dtype} of shape {volume.shape}."
        )
    if not np.isfinite(volume).all():
        raise InputError(f"{name}: key 'reconstruction' contains NaN or Inf values, expected a finite magnitude volume.")
    path = out_dir / name
    if path.exists():
        try:
            with h5py.File(path, "r") as hf:
                is_input = "kspace" in hf
        except OSError:
            is_input = False
        if is_input:
            raise InputError(f"{path}: refusing to overwrite an input file (it has key 'kspace'); expected a separate output folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_h5(path) as hf:
        hf.create_dataset("reconstruction", data=volume.astype(np.float32), track_times=False)
    return path
