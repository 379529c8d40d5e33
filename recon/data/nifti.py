"""NIfTI magnitude images (via nibabel), used as targets for retrospective simulation.

The site simulator samples slices of such a volume on its own grid (:mod:`recon.data.anatomy`),
so any magnitude volume a user brings — or nibabel's bundled EPI example — becomes multi-coil
k-space with the same code path as the MNI152 template.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from recon.errors import InputError

__all__ = ["NiftiVolume", "read_nifti_magnitude"]


@dataclass(frozen=True, eq=False)
class NiftiVolume:
    """One 3-D magnitude volume on its voxel grid.

    Shape: ``data`` ``(X, Y, Z)`` float32 ≥ 0 (voxel axes as stored); ``voxel_mm`` ``(3,)``;
    ``affine`` ``(4, 4)`` voxel → world (mm).
    """

    data: np.ndarray
    voxel_mm: tuple[float, float, float]
    affine: np.ndarray
    path: str


def read_nifti_magnitude(path: str | os.PathLike, volume: int = 0) -> NiftiVolume:
    """Read a NIfTI file as a non-negative magnitude volume.

    Maths: ``|v|`` of the stored (scaled) values; 4-D files give their ``volume``-th 3-D volume.

    Shape: file ``(X, Y, Z)`` or ``(X, Y, Z, T)`` → ``data`` ``(X, Y, Z)`` float32.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        volume: Index along the 4th dimension for 4-D files.

    Raises:
        InputError: missing or unreadable file, complex data, rank other than 3/4 (or 4-D with
            trailing singleton), a ``volume`` out of range, NaN/Inf values, or an all-zero volume.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected a NIfTI magnitude image (.nii or .nii.gz).")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}), expected a magnitude image.") from None
    if data.dtype.kind == "c":
        raise InputError(f"{path}: key 'data' is complex ({data.dtype}), expected a real magnitude image.")
    if data.ndim == 4:
        if not 0 <= volume < data.shape[3]:
            raise InputError(f"{path}: key 'volume' must be in [0, {data.shape[3]}), got {volume}.")
        data = data[..., volume]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: key 'data' must be a 3-D (or 4-D) volume, got shape {data.shape}.")
    data = np.abs(np.asarray(data, dtype=np.float32))
    if not np.isfinite(data).all():
        raise InputError(f"{path}: key 'data' contains NaN or Inf values, expected a finite magnitude image.")
    if not (data > 0).any():
        raise InputError(f"{path}: key 'data' is all zero, expected a magnitude image with signal.")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return NiftiVolume(data=data, voxel_mm=zooms, affine=np.asarray(image.affine, dtype=np.float64), path=str(path))
