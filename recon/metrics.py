"""Image-quality metrics with fastMRI's definitions (``fastmri.evaluate``), on magnitude images.

Metrics are volume-wise, as in fastMRI's evaluation: NMSE and PSNR over the whole volume, SSIM the
mean of per-slice SSIMs, and ``maxval`` defaults to the maximum of the target volume. Inputs may be
torch tensors or numpy arrays, real or complex (the magnitude is taken), of shape
``(slices, H, W)``, ``(H, W)`` (one slice) or the project's image shape ``(slices, 1, H, W)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fastmri import evaluate as fastmri_evaluate

from recon.errors import InputError

__all__ = ["evaluate", "nmse", "psnr", "ssim"]

_SSIM_WINDOW = 7  # skimage's default window, used by fastMRI


def _as_volume(x: Any, name: str, caller: str) -> np.ndarray:
    """Magnitude volume ``(slices, H, W)`` as numpy, dtype kept for floats (float64 for integers)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        raise InputError(f"{caller}: {name} must be a torch tensor or numpy array, got {type(x).__name__}.")
    if x.dtype.kind == "c":
        x = np.abs(x)
    elif x.dtype.kind in "biu":
        x = x.astype(np.float64)
    elif x.dtype.kind != "f":
        raise InputError(f"{caller}: {name} has dtype {x.dtype}, expected a real or complex numeric array.")
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise InputError(
            f"{caller}: {name} of shape {x.shape} must have shape (slices, H, W), (H, W) or (slices, 1, H, W)."
        )
    return x


def _pair(target: Any, pred: Any, caller: str) -> tuple[np.ndarray, np.ndarray]:
    target_shape = tuple(np.shape(target)) if not isinstance(target, torch.Tensor) else tuple(target.shape)
    pred_shape = tuple(np.shape(pred)) if not isinstance(pred, torch.Tensor) else tuple(pred.shape)
    gt, rec = _as_volume(target, "target", caller), _as_volume(pred, "pred", caller)
    if target_shape != pred_shape:
        raise InputError(f"{caller}: pred of shape {pred_shape} must have the shape of target, {target_shape}.")
    if gt.size == 0:
        raise InputError(f"{caller}: target of shape {target_shape} is empty, expected at least one pixel.")
    return gt, rec


def _fourth_root_limit(dtype: Any) -> float:
    """Largest magnitude whose fourth power (times SSIM's window sums) a float type holds."""
    return float(np.finfo(dtype).max) ** 0.25 / 4


def _square_root_limit(x: np.ndarray) -> float:
    """Largest magnitude whose square, summed over every pixel of ``x``, its float type holds."""
    return float(np.sqrt(np.finfo(x.dtype).max / x.size))


def _widened(gt: np.ndarray, rec: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The pair in float64 where the target reaches ``limit`` (raw scanner scales, whose powers overflow
    float32 but not float64); as given otherwise (fastMRI's exact numbers in the input's own type)."""
    if float(np.max(np.abs(gt))) < limit:
        return gt, rec
    return gt.astype(np.float64), rec.astype(np.float64)


def _check_range(x: np.ndarray, name: str, caller: str) -> None:
    """SSIM multiplies squared means (fourth powers), computed here in float64: refuse values for which
    they overflow even there (a NaN SSIM), magnitudes above about 3e76. Raw scanner scales (~1e13,
    whose fourth powers overflow float32) are fine."""
    limit = _fourth_root_limit(np.float64)
    largest = float(np.max(np.abs(x)))
    if not largest < limit:  # also catches NaN
        raise InputError(
            f"{caller}: {name} holds a magnitude of {largest:.3g}, expected finite values below {limit:.3g} "
            f"(SSIM takes their fourth powers, in float64)."
        )


def _maxval(gt: np.ndarray, maxval: float | None, caller: str) -> float:
    value = float(gt.max()) if maxval is None else float(maxval)
    if not value > 0:
        raise InputError(
            f"{caller}: maxval={value} (the target maximum when not given) must be positive; "
            f"expected a non-zero target."
        )
    return value


def nmse(target: Any, pred: Any) -> float:
    """Normalized mean squared error of magnitude images (``fastmri.evaluate.nmse``).

    Maths: ``NMSE = ||t - p||² / ||t||²`` over the whole volume.

    Shape: ``(slices, H, W)``, ``(H, W)`` or ``(slices, 1, H, W)``, the same for both.

    Args:
        target: Reference (torch or numpy, real or complex).
        pred: Reconstruction.

    Returns:
        NMSE as a Python float.
    """
    gt, rec = _pair(target, pred, "nmse")
    if not np.any(gt):
        raise InputError(f"nmse: target of shape {gt.shape} is all zeros, expected a non-zero target.")
    gt, rec = _widened(gt, rec, _square_root_limit(gt))
    return float(fastmri_evaluate.nmse(gt, rec))


def psnr(target: Any, pred: Any, maxval: float | None = None) -> float:
    """Peak signal-to-noise ratio of magnitude images (``fastmri.evaluate.psnr``), in dB.

    Maths: ``PSNR = 10 log10(maxval² / mean((t - p)²))``, ``maxval = max(t)`` by default.

    Shape: ``(slices, H, W)``, ``(H, W)`` or ``(slices, 1, H, W)``, the same for both.

    Args:
        target: Reference (torch or numpy, real or complex).
        pred: Reconstruction.
        maxval: Data range; defaults to the target volume's maximum.

    Returns:
        PSNR as a Python float (``inf`` for identical volumes).
    """
    gt, rec = _pair(target, pred, "psnr")
    value = _maxval(gt, maxval, "psnr")
    if np.array_equal(gt, rec):
        return float("inf")
    gt, rec = _widened(gt, rec, _square_root_limit(gt))
    return float(fastmri_evaluate.psnr(gt, rec, maxval=value))


def ssim(target: Any, pred: Any, maxval: float | None = None) -> float:
    """Structural similarity of magnitude images (``fastmri.evaluate.ssim``), mean over slices.

    Maths: ``SSIM = mean_s SSIM_7x7(t_s, p_s; data_range = maxval)``, ``maxval = max(t)`` by default.

    Shape: ``(slices, H, W)``, ``(H, W)`` or ``(slices, 1, H, W)``, the same for both; ``H, W >= 7``.

    Args:
        target: Reference (torch or numpy, real or complex).
        pred: Reconstruction.
        maxval: Data range; defaults to the target volume's maximum.

    Returns:
        SSIM as a Python float.

    Raises:
        InputError: a target too small for the window, an all-zero target, or target values so large
            that their fourth powers overflow float64 (SSIM would be NaN).
    """
    gt, rec = _pair(target, pred, "ssim")
    if min(gt.shape[-2:]) < _SSIM_WINDOW:
        raise InputError(
            f"ssim: target of shape {gt.shape} is too small, expected H and W of at least {_SSIM_WINDOW}."
        )
    value = _maxval(gt, maxval, "ssim")
    gt, rec = _widened(gt, rec, _fourth_root_limit(gt.dtype))  # raw scanner scales (~1e13): fourth powers
    _check_range(gt, "target", "ssim")
    return float(fastmri_evaluate.ssim(gt, rec, maxval=value)[0])


def evaluate(target: Any, pred: Any) -> dict[str, float]:
    """PSNR, SSIM and NMSE of a reconstruction with fastMRI's definitions.

    Maths: see :func:`psnr`, :func:`ssim`, :func:`nmse` (``maxval = max(target)``).

    Shape: ``(slices, H, W)``, ``(H, W)`` or ``(slices, 1, H, W)``, the same for both.

    Args:
        target: Reference (torch or numpy, real or complex).
        pred: Reconstruction.

    Returns:
        ``{"psnr": ..., "ssim": ..., "nmse": ...}``.
    """
    gt, rec = _pair(target, pred, "evaluate")
    return {"psnr": psnr(gt, rec), "ssim": ssim(gt, rec), "nmse": nmse(gt, rec)}
