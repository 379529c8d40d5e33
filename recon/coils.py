"""Coil sensitivities (ESPIRiT through sigpy) and root-sum-of-squares coil combination.

Sensitivity maps have the shape of k-space, ``(coils, H, W)`` or ``(batch, coils, H, W)``,
``torch.complex64``. The SENSE combination ``sum_c conj(S_c) x_c`` is the adjoint of the Sense
operator and lives in :mod:`recon.operators`.
"""

from __future__ import annotations

import numpy as np
import torch

from recon.errors import InputError

__all__ = ["espirit_maps", "rss"]

_ESPIRIT_KERNEL_WIDTH = 6  # sigpy's default calibration kernel width


def espirit_maps(
    kspace: torch.Tensor,
    calib_width: int = 24,
    threshold: float = 0.02,
    crop: float = 0.95,
    max_iter: int = 100,
) -> torch.Tensor:
    """ESPIRiT coil sensitivity maps from the auto-calibration (ACS) centre of k-space.

    Maths: eigenvector of the ESPIRiT operator with eigenvalue ~1 at each pixel (Uecker et al.
    2014), from the central ``calib_width x calib_width`` block of k-space; phase relative to
    coil 0, ``sum_c |S_c|² = 1`` where the eigenvalue exceeds ``crop`` and ``S = 0`` elsewhere.
    Computed by ``sigpy.mri.app.EspiritCalib`` on the CPU, one batch item at a time.

    Shape: ``kspace`` ``(C, H, W)`` or ``(B, C, H, W)`` complex; returns the same shape,
    ``torch.complex64``, on ``kspace.device``.

    Args:
        kspace: Centered k-space (the orthonormal ``fft2c`` convention). Undersampled k-space is
            fine provided the central ``calib_width`` block is fully sampled: only it is used.
        calib_width: Side of the central calibration block, at most ``min(H, W)``.
        threshold: Singular values below ``threshold * max`` of the calibration matrix are dropped.
        crop: Eigenvalue threshold below which maps are set to zero (outside the object).
        max_iter: Power-method iterations.

    Returns:
        The sensitivity maps.

    Raises:
        InputError: wrong rank or dtype, or a calibration width that does not fit.
    """
    from sigpy.mri.app import EspiritCalib

    if not isinstance(kspace, torch.Tensor):
        raise InputError(
            f"espirit_maps: kspace must be a torch tensor of shape (C, H, W) or (B, C, H, W), "
            f"got {type(kspace).__name__}."
        )
    if kspace.ndim not in (3, 4):
        raise InputError(
            f"espirit_maps: kspace of shape {tuple(kspace.shape)} must have shape (C, H, W) or (B, C, H, W)."
        )
    if not kspace.is_complex():
        raise InputError(
            f"espirit_maps: kspace of dtype {kspace.dtype} must be complex (torch.complex64), not real/imag "
            f"channels; use torch.view_as_complex on a (..., 2) tensor."
        )
    height, width = kspace.shape[-2:]
    if not _ESPIRIT_KERNEL_WIDTH < calib_width <= min(height, width):
        raise InputError(
            f"espirit_maps: calib_width={calib_width} must be more than {_ESPIRIT_KERNEL_WIDTH} and at most "
            f"min(H, W)={min(height, width)} for kspace of shape {tuple(kspace.shape)}."
        )
    if not 0 < crop < 1 or not threshold >= 0 or int(max_iter) < 1:
        raise InputError(
            f"espirit_maps: expected 0 < crop < 1, threshold >= 0 and max_iter >= 1, got crop={crop}, "
            f"threshold={threshold}, max_iter={max_iter}."
        )

    batch = kspace.detach().to("cpu", torch.complex64).numpy()
    batched = batch.ndim == 4
    if not batched:
        batch = batch[None]
    maps = np.stack(
        [
            EspiritCalib(
                item,
                calib_width=int(calib_width),
                thresh=float(threshold),
                kernel_width=_ESPIRIT_KERNEL_WIDTH,
                crop=float(crop),
                max_iter=int(max_iter),
                show_pbar=False,
            ).run()
            for item in batch
        ]
    ).astype(np.complex64)
    if not batched:
        maps = maps[0]
    return torch.from_numpy(maps).to(kspace.device)


def rss(x: torch.Tensor, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
    """Root-sum-of-squares over coils.

    Maths: ``rss(x) = sqrt(sum_c |x_c|²)``.

    Shape: ``x`` ``(B, C, H, W)`` (coils on ``dim``) -> ``(B, H, W)``, or ``(B, 1, H, W)`` with
    ``keepdim=True``; real dtype (float32 for complex64 input).

    Args:
        x: Complex or real coil images.
        dim: Coil dimension.
        keepdim: Keep the reduced dimension with size 1 (the project's image shape).

    Returns:
        Real magnitude image.
    """
    return torch.linalg.vector_norm(x, ord=2, dim=dim, keepdim=keepdim)
