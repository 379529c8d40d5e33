"""Anatomy from image files: stacks of 2-D slices (``.npy`` / ``.npz`` / NIfTI), split by index ranges.

A site whose ``anatomy.source`` is ``images`` simulates its acquisition from real scanner images
(for example ``../shared/data/real/stanford_knee_rss.npy``) at the images' own matrix: each slice
is centre-cropped or zero-padded to the site's ``acquisition.matrix`` only, never resampled.
Complex images keep their phase; magnitude images get the simulator's smooth background phase.

Splits are named lists of half-open index ranges over the stack's first axis, e.g.
``{"train": ["0:10"], "val": ["10:12"], "test": ["12:18"]}``; they must be disjoint.
"""

from __future__ import annotations

import importlib.resources
import os
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from recon.errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "PROJECT_ROOT",
    "PACKAGE_PREFIX",
    "resolve_data_path",
    "read_image_stack",
    "parse_index_ranges",
    "split_indices",
    "RESLICE_AXES",
    "reslice",
    "fit_matrix",
    "target_images",
]

IMAGE_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The checkout that holds ``configs/``: relative data paths of committed configs start here."""


PACKAGE_PREFIX = "package:"
"""A data path ``package:PKG/FILE`` names a file shipped inside an installed package (e.g. the demo's
``package:recon.data/colin27_t1_slices.npy``), found the same way in a checkout and a regular install."""


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A data path as a config gives it: ``package:PKG/FILE`` is a file inside the installed package
    ``PKG``; ``~`` is expanded; a relative path is taken from the project root when it exists there
    (committed configs say ``../shared/data/real/...``), else from the working folder.

    Shape: none.
    """
    text = str(path)
    if text.startswith(PACKAGE_PREFIX):
        package, _, name = text[len(PACKAGE_PREFIX):].partition("/")
        try:
            return Path(str(importlib.resources.files(package).joinpath(name)))
        except ModuleNotFoundError:
            return Path(text)  # read_image_stack then names the missing file
    p = Path(os.path.expanduser(text))
    if p.is_absolute():
        return p
    from_root = PROJECT_ROOT / p
    return from_root if from_root.exists() or not p.exists() else p


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def read_image_stack(path: str | os.PathLike, key: str | None = None, where: str = "anatomy.path") -> np.ndarray:
    """Read a stack of 2-D slices.

    Maths: none (values as stored; NIfTI slices are taken along the third voxel axis).

    Shape: ``.npy`` / ``.npz`` arrays ``(N, H, W)`` (or one ``(H, W)`` slice); NIfTI ``(X, Y, Z)`` gives
    ``(Z, X, Y)``. Returns ``(N, H, W)`` complex128 for complex data, float64 otherwise.

    Args:
        path: The file.
        key: The array inside an ``.npz`` (may be omitted when it holds exactly one).
        where: The config key that named the file (for error messages).

    Raises:
        InputError: a missing or unreadable file, an unknown suffix, a pickled object array, a missing
            ``.npz`` key, a rank other than 2 or 3, a non-numeric dtype, NaN/Inf values, or no signal.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: key '{where}' names a file that does not exist, expected a stack of 2-D images "
                         f"({', '.join(IMAGE_SUFFIXES)}).")
    suffix = _suffix(path)
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.keys())
                if key is None and len(names) != 1:
                    raise InputError(f"{path}: key 'anatomy.key' is not set and the archive holds {len(names)} arrays "
                                     f"({', '.join(names)}), expected the name of one.")
                name = key if key is not None else names[0]
                if name not in names:
                    raise InputError(f"{path}: key 'anatomy.key' is {name!r}, expected one of {', '.join(names)}.")
                array = archive[name]
        elif suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            array = np.asanyarray(nib.load(str(path)).dataobj)
            while array.ndim > 3 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim == 3:
                array = np.moveaxis(array, 2, 0)
        else:
            raise InputError(f"{path}: key '{where}' has suffix {suffix!r}, expected one of {', '.join(IMAGE_SUFFIXES)}.")
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: key '{where}' cannot be read ({type(exc).__name__}), expected a stack of "
                         f"2-D images ({', '.join(IMAGE_SUFFIXES)}).") from None
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"{path}: key '{where}' cannot be read ({type(exc).__name__}), expected a stack of "
                         f"2-D images.") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.dtype.kind not in "fciu" or min(array.shape) < 1:
        raise InputError(f"{path}: key '{where}' holds {array.dtype} of shape {array.shape}, expected real or "
                         f"complex images of shape (N, H, W).")
    array = array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: key '{where}' holds NaN or infinite values, expected finite images.")
    if not (np.abs(array) > 0).any():
        raise InputError(f"{path}: key '{where}' is all zero, expected images with signal.")
    return array


def parse_index_ranges(ranges: Sequence[str | int], count: int, where: str) -> list[int]:
    """Indices named by a list of ranges ``"a:b"`` or ``"a:b:step"`` (half-open, like Python slices) or
    single integers.

    Shape: none; returns sorted unique indices, each in ``[0, count)``.

    Raises:
        InputError: a malformed item, an empty or out-of-range range, a step < 1, or no index at all.
    """
    out: list[int] = []
    for item in ranges:
        text = str(item).strip()
        try:
            parts = [int(t) for t in text.split(":")]
        except ValueError:
            raise InputError(f"key '{where}' holds {item!r}, expected 'start:stop', 'start:stop:step' or an index.") from None
        if len(parts) == 1:
            parts = [parts[0], parts[0] + 1]
        if len(parts) not in (2, 3):
            raise InputError(f"key '{where}' holds {item!r}, expected 'start:stop', 'start:stop:step' or an index.")
        a, b = parts[0], parts[1]
        step = parts[2] if len(parts) == 3 else 1
        if not 0 <= a < b <= count or step < 1:
            raise InputError(f"key '{where}' holds {item!r}, expected a non-empty range inside [0, {count}) "
                             f"with a step >= 1.")
        out.extend(range(a, b, step))
    if not out:
        raise InputError(f"key '{where}' is empty, expected at least one index range like '0:10'.")
    return sorted(set(out))


def split_indices(splits: Mapping[str, Sequence[str | int]], count: int, source: str,
                  gap: int = 0) -> dict[str, list[int]]:
    """Every named split's indices, checked to be disjoint and at least ``gap`` indices apart.

    Maths: for indices ``i`` and ``j`` of two different splits, ``|i − j| > gap`` (``gap`` slices lie
    between them); slabs of one volume need a gap because neighbouring slices are nearly the same image.

    Shape: none.

    Raises:
        InputError: a bad range (see :func:`parse_index_ranges`), two splits sharing an index, or two
            splits closer than ``gap``.
    """
    indices = {name: parse_index_ranges(r, count, f"data.splits.{name}") for name, r in splits.items()}
    names = list(indices)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(indices[a]) & set(indices[b]))
            if shared:
                raise InputError(f"{source}: keys 'data.splits.{a}' and 'data.splits.{b}' share indices "
                                 f"{shared[:5]}, expected disjoint splits.")
            if gap > 0:
                ia, ib = np.asarray(indices[a]), np.asarray(indices[b])
                dist = np.abs(ia[:, None] - ib[None, :])
                k, m = np.unravel_index(int(np.argmin(dist)), dist.shape)
                if dist[k, m] <= gap:
                    raise InputError(f"{source}: keys 'data.splits.{a}' and 'data.splits.{b}' hold slices {ia[k]} and "
                                     f"{ib[m]}, {dist[k, m] - 1} apart, expected at least 'data.split_gap' = {gap} "
                                     f"slices between splits.")
    return indices


RESLICE_AXES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
"""Axis orders that turn a volume stored ``(z, y, x)`` (axial slices first) into slices of each plane."""


def reslice(volume: np.ndarray, orientation: str) -> np.ndarray:
    """Slices of a volume along another plane.

    Maths: the volume is stored as axial slices ``v[z, y, x]`` (``z`` increasing towards the top of the
    head, row 0 anterior); ``axial`` returns it as it is, ``coronal`` gives slices ``v[::-1, y, :]``
    (superior at row 0) and ``sagittal`` ``v[::-1, :, x]`` (superior at row 0, anterior at column 0).

    Shape: ``(Z, Y, X)`` → axial ``(Z, Y, X)``, coronal ``(Y, Z, X)``, sagittal ``(X, Z, Y)``.
    """
    if orientation not in RESLICE_AXES:
        raise InputError(f"key 'anatomy.orientation' is {orientation!r}, expected one of {', '.join(RESLICE_AXES)}.")
    out = np.transpose(volume, RESLICE_AXES[orientation])
    return out if orientation == "axial" else out[:, ::-1, :]


def fit_matrix(image: np.ndarray, matrix: tuple[int, int]) -> np.ndarray:
    """Centre-crop or zero-pad an image to ``matrix`` (each side on its own; no resampling).

    Maths: fastMRI's ``center_crop`` convention — a crop keeps rows ``[(H − h) // 2, (H − h) // 2 + h)``
    (likewise columns); a pad puts ``(h − H) // 2`` zero rows before the image and the rest after.

    Shape: ``(..., H, W)`` → ``(..., h, w)`` for ``matrix = (h, w)``.
    """
    out = image
    for axis, size in ((-2, matrix[0]), (-1, matrix[1])):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, range(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad)
    return out


def target_images(root: str | os.PathLike, copies: int = 1, seed: int = 0, phase_amplitude: float = 1.5) -> np.ndarray:
    """Training images from a folder of fastMRI h5 files: their targets, normalised like a Sample.

    Maths: ``x = target / scale · exp(iφ)`` with ``scale`` the k-space normalisation of the slice
    (:func:`~recon.data.normalization_scale`, the same as at reconstruction) and ``φ`` a smooth
    background phase (:func:`~recon.data.anatomy.background_phase`), a fresh one for each of ``copies``;
    every image is centre-cropped to the smallest target size of the folder.

    Shape: returns ``(copies · slices, H, W)`` complex64 (slice-major).

    Raises:
        InputError: any reader error, a file without a target, or ``copies < 1``.
    """
    from recon.data.anatomy import background_phase
    from recon.data.fastmri_io import FastMRISliceDataset

    if copies < 1:
        raise InputError(f"{root}: key 'data.copies' must be a positive integer, got {copies}.")
    dataset = FastMRISliceDataset(root, mask_type=None)
    for info in dataset.volumes:
        if info.target_key is None:
            raise InputError(f"{info.path}: key 'reconstruction_rss' is missing, expected fastMRI targets to train on.")
    targets = [dataset[i].target.numpy() for i in range(len(dataset))]
    matrix = (min(t.shape[0] for t in targets), min(t.shape[1] for t in targets))
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0x464F4C44,)))  # "FOLD"
    return np.stack([fit_matrix(t, matrix) * np.exp(1j * background_phase(rng, matrix, phase_amplitude))
                     for t in targets for _ in range(copies)]).astype(np.complex64)
