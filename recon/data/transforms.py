"""From a complex reconstruction to what a fastMRI submission holds: magnitude, crop, raw scale.

A submission volume is ``(slices, h, w)`` float32 magnitude on the file's raw scale, at fastMRI's
``recon_size`` (the ISMRMRD header's ``reconSpace`` matrix) when the header gives one; otherwise at
the stored target's size, otherwise at the k-space matrix (:func:`output_size`). Every script
writes through :func:`submission_slice`, so the same file gives the same output shape everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recon.data.fastmri_io import VolumeInfo
from recon.data.sample import Sample

__all__ = ["center_crop", "output_size", "submission_slice"]


def center_crop(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Central crop of the last two dims, fastMRI's placement (``fastmri.data.transforms.center_crop``).

    Maths: ``x[..., h₀:h₀+h, w₀:w₀+w]``, ``h₀ = (H − h)//2``, ``w₀ = (W − w)//2``.

    Shape: ``(..., H, W)`` → ``(..., h, w)``; a dim that is not larger is left as it is.
    """
    height, width = image.shape[-2:]
    h, w = min(int(shape[0]), height), min(int(shape[1]), width)
    h0, w0 = (height - h) // 2, (width - w) // 2
    return image[..., h0:h0 + h, w0:w0 + w]


def output_size(info: VolumeInfo, sample: Sample) -> tuple[int, int]:
    """The submission size of a file's slices: header ``recon_size``, else the target's, else the matrix.

    Shape: returns ``(h, w)`` (fastMRI's ``(x, y)`` of ``reconSpace`` read as rows, columns).
    """
    if info.recon_size is not None:
        return info.recon_size
    if sample.target is not None:
        return tuple(sample.target.shape)  # type: ignore[return-value]
    return tuple(sample.kspace.shape[-2:])  # type: ignore[return-value]


def submission_slice(sample: Sample, image: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """``|x|`` of one slice, centre-cropped to ``size`` and brought back to the file's raw scale.

    Maths: ``scale · crop(|x|)``. Shape: ``image`` complex ``(H, W)`` or ``(1, H, W)``; returns
    ``(h, w)`` float32 (numpy, CPU).
    """
    magnitude = center_crop(image.detach().abs().reshape(image.shape[-2:]).cpu(), size)
    return np.asarray(sample.denormalize(magnitude).numpy(), dtype=np.float32)
