"""The one intensity normalisation shared by training and reconstruction.

Raw k-space scale is arbitrary (scanners give peaks anywhere from 1e-6 to 1e13). Every slice is
divided by a scale computed from its fully sampled k-space centre only, so the scale does not
depend on the acceleration or the mask type as long as the centre box is sampled:

    scale = P99( rss( ifft2c( kspace ⊙ mask ⊙ box ) ) )

with ``box = recon.masks.center_box((H, W), box_fraction)`` and ``P99`` the 99th percentile
over pixels of the low-resolution root-sum-of-squares image.
"""

from __future__ import annotations

import torch

from recon.coils import rss
from recon.errors import InputError
from recon.fft import ifft2c
from recon.masks import center_box

__all__ = ["normalization_scale", "BOX_FRACTION", "PERCENTILE"]

BOX_FRACTION = 0.08
"""Side of the central k-space box (fraction of H and of W) used for the scale."""

PERCENTILE = 99.0
"""Percentile of the low-resolution RSS magnitude taken as the scale."""


def normalization_scale(
    kspace: torch.Tensor,
    mask: torch.Tensor | None = None,
    box_fraction: float = BOX_FRACTION,
    source: str = "kspace",
) -> float:
    """Intensity scale of one multi-coil slice from its fully sampled k-space centre.

    Maths: ``scale = P99(rss(ifft2c(y ⊙ M ⊙ B)))``, ``B`` the central ``box_fraction`` box.

    Shape: ``kspace`` ``(C, H, W)`` complex; ``mask`` ``(H, W)`` or broadcastable to ``kspace``
    (``None`` means fully sampled); returns a Python float.

    Args:
        kspace: Raw multi-coil k-space of one slice.
        mask: Sampling mask (0/1); only its values inside the box matter.
        box_fraction: Side of the central box as a fraction of each dimension.
        source: Names the file (and slice) in error messages.

    Returns:
        The positive, finite scale.

    Raises:
        InputError: the k-space is not ``(C, H, W)`` complex, or the central box holds no signal.
    """
    if not isinstance(kspace, torch.Tensor) or not torch.is_complex(kspace) or kspace.dim() != 3:
        got = f"{kspace.dtype} {tuple(kspace.shape)}" if isinstance(kspace, torch.Tensor) else type(kspace).__name__
        raise InputError(f"{source}: key 'kspace' must be a complex tensor of shape (coils, H, W), got {got}.")
    height, width = kspace.shape[-2:]
    weights = center_box((height, width), box_fraction).to(kspace.device)
    if mask is not None:
        weights = weights * mask.to(device=kspace.device, dtype=weights.dtype)
    low_res = rss(ifft2c(kspace * weights), dim=0)
    scale = float(torch.quantile(low_res.flatten().to(torch.float64), PERCENTILE / 100.0))
    if not scale > 0 or scale == float("inf"):
        raise InputError(
            f"{source}: key 'kspace' has no finite signal in the central {box_fraction:g} k-space box, "
            f"expected measured low-frequency data to set the intensity scale (got scale {scale})."
        )
    return scale
