"""The typed container of one measured slice, and the one function that builds it from raw data.

A :class:`Sample` holds *normalised* data: k-space, target and noise level are divided by
``scale`` (see :mod:`recon.data.normalize`); :meth:`Sample.denormalize` brings a reconstruction
back to the file's raw intensity scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from recon.data.normalize import BOX_FRACTION, normalization_scale
from recon.errors import InputError
from recon.masks import as_kspace_mask

__all__ = ["Sample", "sample_from_kspace", "infer_mask", "check_kspace", "check_mask_2d"]


def _describe(x: object) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{x.dtype} of shape {tuple(x.shape)}"
    return type(x).__name__


def check_kspace(kspace: object, source: str, key: str = "kspace") -> torch.Tensor:
    """Check one slice of k-space: complex, ``(C, H, W)``, finite; return it as complex64.

    Maths: none (validation); complex128 is rounded to complex64.

    Shape: ``(C, H, W)`` complex in, ``(C, H, W)`` complex64 out.

    Raises:
        InputError: not a complex tensor/array of rank 3, or NaN/Inf entries.
    """
    if isinstance(kspace, np.ndarray):
        if kspace.dtype.kind != "c":
            raise InputError(f"{source}: key '{key}' must be complex k-space of shape (coils, H, W), got {_describe(kspace)}.")
        kspace = torch.from_numpy(np.ascontiguousarray(kspace))
    if not isinstance(kspace, torch.Tensor) or not torch.is_complex(kspace):
        raise InputError(f"{source}: key '{key}' must be complex k-space of shape (coils, H, W), got {_describe(kspace)}.")
    if kspace.dim() != 3:
        raise InputError(f"{source}: key '{key}' must have rank 3 (coils, H, W) per slice, got shape {tuple(kspace.shape)}.")
    kspace = kspace.to(torch.complex64)
    if not bool(torch.isfinite(torch.view_as_real(kspace)).all()):
        raise InputError(f"{source}: key '{key}' contains NaN or Inf values, expected finite complex k-space.")
    return kspace


def check_mask_2d(mask: object, kspace_shape: tuple[int, ...], source: str, key: str = "mask") -> torch.Tensor:
    """Validate a mask for one slice and expand it to ``(H, W)`` float32 0/1.

    Maths: ``M[h, w] ∈ {0, 1}``, not all zero; a column mask ``m[w]`` becomes ``M[h, w] = m[w]``.

    Shape: ``(W,)``, ``(H, W)``, ``(1, W)``, ``(H, 1)`` or ``(C, H, W)`` equal over coils → ``(H, W)``.

    Raises:
        InputError: does not broadcast to ``kspace_shape``, non-0/1 or non-finite, all zero.
    """
    height, width = kspace_shape[-2:]
    where = f"{source}: key '{key}'"
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) in ((1, width), (height, 1)):
        mask = mask.expand(height, width)
    m = as_kspace_mask(mask, tuple(kspace_shape), source=where)
    if m.dim() > 2:
        flat = m.reshape(-1, height, width)
        if not bool((flat == flat[:1]).all()):
            raise InputError(f"{where} varies across coils, expected one (H, W) = ({height}, {width}) mask for all coils.")
        m = flat[0]
    m = m.expand(height, width).to(torch.float32).contiguous()
    if not bool((m != 0).any()):
        raise InputError(f"{where} is all zero, expected at least one sampled k-space location.")
    return m


def infer_mask(kspace: torch.Tensor) -> torch.Tensor:
    """Sampling mask of prospectively undersampled k-space: where any coil is non-zero.

    Maths: ``M[h, w] = 1`` iff ``∃ c: y[c, h, w] ≠ 0``.

    Shape: ``(..., C, H, W)`` complex → ``(H, W)`` float32 (union over leading dims).
    """
    nonzero = kspace != 0
    return nonzero.reshape(-1, *kspace.shape[-2:]).any(dim=0).to(torch.float32)


@dataclass(frozen=True, eq=False)
class Sample:
    """One normalised slice.

    Maths: ``kspace = M ⊙ y_raw / scale``; ``target = x_target / scale``; ``σ = σ_raw / scale``.

    Shape: ``kspace`` ``(C, H, W)`` complex64; ``mask`` ``(H, W)`` float32 0/1; ``target``
    ``(h, w)`` float32 (the file's stored target; fastMRI stores it centre-cropped to the recon
    size, simulated sites at the k-space size); ``sens_maps`` ``(C, H, W)`` complex64.

    Attributes:
        kspace: Normalised, masked k-space (unsampled entries are zero).
        mask: Sampling mask applied to ``kspace``.
        target: Normalised magnitude target, or ``None``.
        sens_maps: Coil sensitivity maps (scale-free), or ``None``.
        fname: File name (no folder) the slice came from.
        slice_idx: Index of the slice in its file.
        acquisition: The file's ``acquisition`` attribute ("" when absent).
        max_value: The file's ``max`` attribute divided by ``scale`` (for PSNR), or ``None``.
        noise_sigma: Normalised noise standard deviation per complex k-space entry, or ``None``.
        scale: The divisor applied to the raw data (> 0).
        reference: Normalised clean reference magnitude ``(h, w)`` float32 (simulated files'
            ``reconstruction_clean``: the image before simulated noise), or ``None``.
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor | None
    sens_maps: torch.Tensor | None
    fname: str
    slice_idx: int
    acquisition: str
    max_value: float | None
    noise_sigma: float | None
    scale: float
    reference: torch.Tensor | None = None

    def __post_init__(self) -> None:
        source = f"{self.fname} (slice {self.slice_idx})"
        kspace = self.kspace
        if not isinstance(kspace, torch.Tensor) or kspace.dtype != torch.complex64 or kspace.dim() != 3:
            raise InputError(f"{source}: key 'kspace' must be a complex64 tensor of shape (coils, H, W), got {_describe(kspace)}.")
        if not bool(torch.isfinite(torch.view_as_real(kspace)).all()):
            raise InputError(f"{source}: key 'kspace' contains NaN or Inf values, expected finite complex k-space.")
        height, width = kspace.shape[-2:]
        mask = self.mask
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.float32 or tuple(mask.shape) != (height, width):
            raise InputError(f"{source}: key 'mask' must be a float32 tensor of shape ({height}, {width}), got {_describe(mask)}.")
        if not bool(((mask == 0) | (mask == 1)).all()) or not bool((mask != 0).any()):
            raise InputError(f"{source}: key 'mask' must hold 0/1 values with at least one sampled location.")
        for key in ("target", "reference"):
            image = getattr(self, key)
            if image is None:
                continue
            if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or image.dim() != 2:
                raise InputError(f"{source}: key '{key}' must be a float32 tensor of shape (H, W), got {_describe(image)}.")
            if not bool(torch.isfinite(image).all()):
                raise InputError(f"{source}: key '{key}' contains NaN or Inf values, expected a finite magnitude image.")
        if self.sens_maps is not None:
            maps = self.sens_maps
            if not isinstance(maps, torch.Tensor) or maps.dtype != torch.complex64 or maps.shape != kspace.shape:
                raise InputError(
                    f"{source}: key 'sens_maps' must be a complex64 tensor of the k-space shape {tuple(kspace.shape)}, "
                    f"got {_describe(maps)}."
                )
            if not bool(torch.isfinite(torch.view_as_real(maps)).all()):
                raise InputError(f"{source}: key 'sens_maps' contains NaN or Inf values, expected finite sensitivity maps.")
        if not (isinstance(self.scale, float) and math.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"{source}: key 'scale' must be a positive finite float, got {self.scale!r}.")
        for key in ("max_value", "noise_sigma"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, float) and math.isfinite(value) and value >= 0):
                raise InputError(f"{source}: key '{key}' must be a non-negative finite float or None, got {value!r}.")

    @property
    def acceleration(self) -> float:
        """Achieved acceleration ``H W / Σ M``."""
        return float(self.mask.numel() / self.mask.sum())

    def denormalize(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Bring a reconstruction of this sample back to the file's raw intensity scale.

        Maths: ``x_raw = scale · x``.

        Shape: any; same type and shape out.
        """
        return image * self.scale


def _to_float(value: object) -> float | None:
    if value is None:
        return None
    return float(np.asarray(value).reshape(()))


def sample_from_kspace(
    kspace: torch.Tensor | np.ndarray,
    *,
    fname: str,
    slice_idx: int = 0,
    mask: torch.Tensor | np.ndarray | None = None,
    target: torch.Tensor | np.ndarray | None = None,
    sens_maps: torch.Tensor | np.ndarray | None = None,
    acquisition: str = "",
    max_value: float | None = None,
    noise_sigma: float | None = None,
    box_fraction: float = BOX_FRACTION,
    reference: torch.Tensor | np.ndarray | None = None,
) -> Sample:
    """Validate raw data of one slice, apply its mask and normalise it into a :class:`Sample`.

    Maths: ``scale = normalization_scale(M ⊙ y, M)``; ``kspace = M ⊙ y / scale``;
    ``target / scale``, ``reference / scale``, ``max_value / scale``, ``noise_sigma / scale``.

    Shape: ``kspace`` ``(C, H, W)`` complex (raw scale); ``mask`` broadcastable to it or
    ``None`` (inferred from all-zero entries); ``target`` and ``reference`` ``(h, w)`` real (raw scale);
    ``sens_maps`` ``(C, H, W)`` complex.

    Args:
        kspace: Raw k-space of one slice.
        fname: File name used in the Sample and in error messages.
        slice_idx: Slice index in the file.
        mask: Sampling mask; ``None`` infers it from the entries that are zero on every coil.
        target: Raw-scale magnitude target, or ``None``.
        sens_maps: Coil sensitivity maps, or ``None``.
        acquisition: Acquisition label.
        max_value: Raw-scale maximum of the target volume, or ``None``.
        noise_sigma: Raw-scale noise standard deviation per complex entry, or ``None``.
        box_fraction: Centre box for the normalisation scale.
        reference: Raw-scale clean reference magnitude, or ``None``.

    Returns:
        The normalised sample.

    Raises:
        InputError: naming ``fname`` and the offending key.
    """
    source = f"{fname} (slice {slice_idx})"
    kspace = check_kspace(kspace, source)
    if mask is None:
        mask_2d = infer_mask(kspace)
        if not bool((mask_2d != 0).any()):
            raise InputError(f"{source}: key 'kspace' is all zero, so the inferred mask samples nothing; expected measured k-space.")
    else:
        mask_2d = check_mask_2d(mask, tuple(kspace.shape), source)
    masked = kspace * mask_2d
    scale = normalization_scale(masked, mask_2d, box_fraction=box_fraction, source=source)

    def normalised(image: torch.Tensor | np.ndarray | None, key: str) -> torch.Tensor | None:
        if image is None:
            return None
        image_t = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image)
        if image_t.is_complex() or image_t.dim() != 2:
            raise InputError(f"{source}: key '{key}' must be a real image of shape (H, W), got {_describe(image_t)}.")
        return (image_t.to(torch.float64) / scale).to(torch.float32)

    target_t = normalised(target, "target")
    reference_t = normalised(reference, "reference")
    maps_t = None
    if sens_maps is not None:
        maps_t = torch.as_tensor(sens_maps)
        if not maps_t.is_complex() or tuple(maps_t.shape) != tuple(kspace.shape):
            raise InputError(
                f"{source}: key 'sens_maps' must be complex with the k-space shape {tuple(kspace.shape)}, "
                f"got {_describe(maps_t)}."
            )
        maps_t = maps_t.to(torch.complex64)
    max_f = _to_float(max_value)
    sigma_f = _to_float(noise_sigma)
    return Sample(
        kspace=(masked / scale).to(torch.complex64),
        mask=mask_2d,
        target=target_t,
        sens_maps=maps_t,
        fname=str(fname),
        slice_idx=int(slice_idx),
        acquisition=str(acquisition),
        max_value=None if max_f is None else max_f / scale,
        noise_sigma=None if sigma_f is None else sigma_f / scale,
        scale=float(scale),
        reference=reference_t,
    )
