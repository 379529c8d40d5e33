"""Linear MRI forward operators and a batched conjugate-gradient solver.

Every operator defines ``A`` and ``A_adjoint``; ``normal`` (``AᴴA``), composition (``@``) and the
adjoint view (``.H``) come from the base class. Operators are immutable: a new mask or new maps
make a new operator.

Shapes (DESIGN.md): images ``(batch, 1, H, W)``, k-space ``(batch, coils, H, W)``, sensitivity
maps like k-space, masks broadcastable to k-space; all native complex (complex64 or complex128).

Fast path (even ``H`` and ``W``): the centred FFT is ``s·C⊙FFT(C⊙x)`` (``recon.fft``), so
``Sense`` folds ``s·C`` into the sensitivity maps and ``C`` into the mask once, at construction:
``A x = (C⊙M) ⊙ FFT((s·C⊙S) x)`` — no shift copies and no modulation passes at apply time; the
FFT's normalisation is folded into those stored masks too (unnormalised FFTs, no scaling pass).
The normal operator needs only ``M²`` (``C² = 1``), and when the mask is constant along ``H``
(1-D Cartesian undersampling) ``Fᴴ M F`` reduces to 1-D FFTs along ``W``, since the FFT along
``H`` cancels with its inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from recon.errors import InputError
from recon.fft import checkerboard, checkerboard_sign, fft2c, ifft2c

__all__ = [
    "LinearOperator",
    "Composition",
    "Adjoint",
    "Fourier",
    "Diagonal",
    "CoilExpansion",
    "SingleCoil",
    "Sense",
    "coil_reduce",
    "CGResult",
    "conjugate_gradient",
    "inner",
]

_DIMS = (-2, -1)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched complex inner product ``⟨a, b⟩ = Σ conj(a)·b`` over all dims but the first.

    Shape: ``(batch, ...)`` × ``(batch, ...)`` → ``(batch,)`` complex.
    """
    return torch.sum(a.conj() * b, dim=tuple(range(1, a.dim())))


class LinearOperator:
    """A linear map with ``A`` and ``A_adjoint``; ``normal`` defaults to ``A_adjoint(A(x))``."""

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the maths' name)
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        raise NotImplementedError

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``AᴴA x``."""
        return self.A_adjoint(self.A(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)

    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Composition(self, other)

    @property
    def H(self) -> "LinearOperator":  # noqa: N802
        """The adjoint operator ``Aᴴ``."""
        return Adjoint(self)


class Composition(LinearOperator):
    """``(outer @ inner) x = outer(inner(x))``; adjoint ``innerᴴ(outerᴴ(y))``."""

    def __init__(self, outer: LinearOperator, inner_op: LinearOperator) -> None:
        self.outer, self.inner = outer, inner_op

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.outer.A(self.inner.A(x))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.inner.A_adjoint(self.outer.A_adjoint(y))


class Adjoint(LinearOperator):
    """The adjoint view ``Aᴴ`` of an operator."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.op.A_adjoint(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.op.A(y)

    @property
    def H(self) -> LinearOperator:  # noqa: N802
        return self.op


class Fourier(LinearOperator):
    """The centred orthonormal 2-D DFT ``F`` over the last two dims (unitary: ``FᴴF = I``).

    Shape: ``(..., H, W)`` complex → same.
    """

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return fft2c(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return ifft2c(y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Diagonal(LinearOperator):
    """Pointwise multiplication ``x ↦ d ⊙ x`` (a mask, a weighting); adjoint ``conj(d) ⊙ y``.

    Shape: ``d`` broadcastable to the input; output has the broadcast shape.
    """

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights.detach().clone()

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.weights * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.weights.conj() * y


class CoilExpansion(LinearOperator):
    """Multiply an image by each coil's sensitivity: ``x ↦ (S_c x)_c``; adjoint ``Σ_c conj(S_c) y_c``.

    Shape: maps ``(B, C, H, W)``; image ``(B, 1, H, W)`` → coil images ``(B, C, H, W)``.
    """

    def __init__(self, sens_maps: torch.Tensor) -> None:
        self.sens_maps = sens_maps.detach().clone()

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.sens_maps * x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return torch.sum(self.sens_maps.conj() * y, dim=1, keepdim=True)


def _check_mask(mask: torch.Tensor, kspace_shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a torch tensor, got {type(mask).__name__}")
    if torch.is_complex(mask):
        raise InputError(f"mask must be real (0/1 weights), got dtype {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, kspace_shape)
    except RuntimeError:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to k-space shape {tuple(kspace_shape)}"
        ) from None
    if mask.dim() > len(kspace_shape):
        raise InputError(f"mask of shape {tuple(mask.shape)} has more dims than k-space {tuple(kspace_shape)}")
    if not torch.isfinite(mask).all():
        raise InputError("mask contains NaN or Inf values")
    if not (mask != 0).any():
        raise InputError("mask is all zero: no k-space sample is measured")
    return mask


def _coil_reduce_real(maps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Σ_c conj(S_c)·z_c`` on real views ``(B, C, H, W, 2)``: one fused pass when compiled."""
    mr, mi, zr, zi = maps[..., 0], maps[..., 1], z[..., 0], z[..., 1]
    re = torch.sum(mr * zr + mi * zi, dim=1, keepdim=True)
    im = torch.sum(mr * zi - mi * zr, dim=1, keepdim=True)
    return torch.stack([re, im], dim=-1)


_compiled_reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def coil_reduce(maps: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Coil combination ``Σ_c conj(S_c) ⊙ z_c``.

    With ``fused=True`` the conjugate-multiply and the sum over coils run as one
    ``torch.compile``-generated kernel on real views (autograd works through it); otherwise
    eager torch (two passes).
    Shape: ``maps`` ``(B, C, H, W)``, ``z`` ``(B, C, H, W)`` complex → ``(B, 1, H, W)``.
    """
    global _compiled_reduce
    if not fused:
        return torch.sum(maps.conj() * z, dim=1, keepdim=True)
    if _compiled_reduce is None:
        _compiled_reduce = torch.compile(_coil_reduce_real)
    out = _compiled_reduce(torch.view_as_real(maps.resolve_conj()), torch.view_as_real(z.resolve_conj()))
    return torch.view_as_complex(out)


def _constant_along_h(mask: torch.Tensor) -> bool:
    return mask.dim() < 2 or mask.shape[-2] == 1 or bool(torch.equal(mask, mask[..., :1, :].expand_as(mask)))


class Sense(LinearOperator):
    """Multi-coil Cartesian SENSE operator ``A = M F S``.

    Maths: ``(A x)_c = M ⊙ fft2c(S_c ⊙ x)``; ``Aᴴ y = Σ_c conj(S_c) ⊙ ifft2c(M ⊙ y_c)``.
    Shape: ``sens_maps`` ``(B, C, H, W)`` complex; ``mask`` real, broadcastable to it
    (``(W,)``, ``(H, W)``, ``(B, 1, H, W)``, …); image ``(B, 1, H, W)`` → k-space ``(B, C, H, W)``.
    ``fused``: fuse the coil combination into one compiled kernel (default: on CUDA only).
    """

    def __init__(self, sens_maps: torch.Tensor, mask: torch.Tensor, fused: bool | None = None) -> None:
        if not isinstance(sens_maps, torch.Tensor) or not torch.is_complex(sens_maps) or sens_maps.dim() != 4:
            shape = tuple(sens_maps.shape) if isinstance(sens_maps, torch.Tensor) else type(sens_maps).__name__
            raise InputError(f"sens_maps must be a complex tensor of shape (batch, coils, H, W), got {shape}")
        mask = _check_mask(mask, tuple(sens_maps.shape))
        real = torch.float64 if sens_maps.dtype == torch.complex128 else torch.float32
        self.sens_maps = sens_maps.detach().clone()
        self.mask = mask.detach().to(device=sens_maps.device, dtype=real).clone()
        self.shape = tuple(sens_maps.shape)
        self.fused = sens_maps.device.type == "cuda" if fused is None else bool(fused)
        h, w = self.shape[-2:]
        self._even = h % 2 == 0 and w % 2 == 0
        self._mask_sq = self.mask * self.mask
        # the normal operator only needs FFTs along W when the mask is the same on every row
        self._mask_1d = _constant_along_h(self.mask)
        # The FFT normalisation is folded into the stored masks, so the FFTs below run unnormalised
        # (norm="backward" forward, norm="forward" inverse: no extra scaling pass on either side).
        if self._mask_1d:
            row = self._mask_sq[..., :1, :] if self._mask_sq.dim() >= 2 else self._mask_sq
            self._mask_sq_row = row / w
        self._mask_sq_scaled = self._mask_sq / (h * w)
        if self._even:
            c = checkerboard(h, w, real, sens_maps.device)
            self._maps_mod = self.sens_maps * (checkerboard_sign(h, w) * c)
            self._mask_mod = self.mask * c / math.sqrt(h * w)

    def _check_image(self, x: torch.Tensor) -> None:
        b, _, h, w = self.shape
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[-2:] != (h, w) or x.shape[0] not in (1, b):
            raise InputError(f"Sense expects an image of shape ({b}, 1, {h}, {w}), got {tuple(x.shape)}")

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self._check_image(x)
        if self._even:
            return torch.fft.fft2(self._maps_mod * x, dim=_DIMS, norm="backward").mul_(self._mask_mod)
        return self.mask * fft2c(self.sens_maps * x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        if y.shape[-3:] != self.shape[-3:]:
            raise InputError(f"Sense expects k-space of shape {self.shape}, got {tuple(y.shape)}")
        if self._even:
            z = torch.fft.ifft2(self._mask_mod * y, dim=_DIMS, norm="forward")
            return coil_reduce(self._maps_mod, z, self.fused)
        return coil_reduce(self.sens_maps, ifft2c(self.mask * y), self.fused)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``AᴴA x = Σ_c conj(S_c) Fᴴ M² F (S_c x)``; 1-D FFTs along ``W`` for row-constant masks."""
        self._check_image(x)
        if not self._even:
            return self.A_adjoint(self.A(x))
        z = self._maps_mod * x
        if self._mask_1d:
            z = torch.fft.fft(z, dim=-1, norm="backward").mul_(self._mask_sq_row)
            z = torch.fft.ifft(z, dim=-1, norm="forward")
        else:
            z = torch.fft.fft2(z, dim=_DIMS, norm="backward").mul_(self._mask_sq_scaled)
            z = torch.fft.ifft2(z, dim=_DIMS, norm="forward")
        return coil_reduce(self._maps_mod, z, self.fused)


class SingleCoil(Sense):
    """Single-coil Cartesian operator ``A = M F`` (``Sense`` with one all-ones map).

    Shape: ``mask`` broadcastable to ``(B, 1, H, W)``; ``image_shape = (B, 1, H, W)``;
    image ``(B, 1, H, W)`` → k-space ``(B, 1, H, W)``.
    """

    def __init__(self, mask: torch.Tensor, image_shape: tuple[int, int, int, int],
                 dtype: torch.dtype = torch.complex64, device: torch.device | str = "cpu") -> None:
        if len(image_shape) != 4 or image_shape[1] != 1:
            raise InputError(f"SingleCoil expects image_shape (batch, 1, H, W), got {tuple(image_shape)}")
        super().__init__(torch.ones(image_shape, dtype=dtype, device=device), mask)


@dataclass(frozen=True)
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        x: the solution, shape of ``b``.
        iterations: iterations run.
        residual: final relative residual ``‖b − (AᴴA + λI)x‖ / ‖b‖`` per batch item, shape ``(batch,)``.
    """

    x: torch.Tensor
    iterations: int
    residual: torch.Tensor


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    lam: float | torch.Tensor = 0.0,
    x0: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-6,
) -> CGResult:
    """Batched conjugate gradient for ``(AᴴA + λI) x = b``, each batch item its own system.

    Maths: standard CG on the Hermitian positive (semi-)definite ``AᴴA + λI``; stops when every
    item's relative residual ``‖r‖/‖b‖`` is below ``tol`` or after ``max_iter`` iterations.
    Shape: ``b`` ``(batch, ...)`` complex; ``lam`` a float or ``(batch,)``; returns ``x`` like ``b``.
    """
    batch = b.shape[0]
    view = (batch,) + (1,) * (b.dim() - 1)
    lam_t = torch.as_tensor(lam, dtype=b.real.dtype, device=b.device).reshape(-1)
    lam_t = lam_t.expand(batch).reshape(view) if lam_t.numel() in (1, batch) else None
    if lam_t is None:
        raise InputError(f"lam must be a scalar or have one value per batch item ({batch}), got {tuple(torch.as_tensor(lam).shape)}")

    def system(v: torch.Tensor) -> torch.Tensor:
        return normal(v) + lam_t * v

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - system(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = inner(r, r).real
    b_norm = inner(b, b).real.sqrt().clamp_min(torch.finfo(b.real.dtype).tiny)
    it = 0
    for it in range(1, max_iter + 1):
        if bool((rr.sqrt() / b_norm <= tol).all()):
            it -= 1
            break
        ap = system(p)
        pap = inner(p, ap).real
        alpha = torch.where(pap > 0, rr / pap.clamp_min(torch.finfo(b.real.dtype).tiny), torch.zeros_like(rr))
        x = x + alpha.reshape(view) * p
        r = r - alpha.reshape(view) * ap
        rr_new = inner(r, r).real
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(b.real.dtype).tiny), torch.zeros_like(rr))
        p = r + beta.reshape(view) * p
        rr = rr_new
    return CGResult(x=x, iterations=it, residual=rr.sqrt() / b_norm)
