"""Data consistency: hard projection, gradient step and the prox, as sampler callables.

Every data-consistency object is a callable ``dc(x, sigma) -> x`` on complex images
``(B, 1, H, W)`` — the signature the samplers in ``scores.samplers`` take — where ``x`` is the
prior's current estimate and ``sigma`` the current noise level (unused by the plain rules).

Maths (``A = M F S``, measured ``y``):

- hard projection (single-coil): ``x ← Fᴴ((1 − M) ⊙ F x + M ⊙ y)``
- gradient step: ``x ← x − η Aᴴ(A x − y)``
- prox: ``x(λ) = argmin ‖A x − y‖² + λ‖x − x̂₀‖² = (AᴴA + λI)⁻¹(Aᴴy + λ x̂₀)`` —
  closed form ``Fᴴ (M y + λ F x̂₀) / (M² + λ)`` for single-coil Cartesian, CG for ``Sense``.
"""

from __future__ import annotations

from typing import Callable

import torch

from recon.errors import InputError
from recon.fft import fft2c, ifft2c
from recon.operators import LinearOperator, Sense, SingleCoil, conjugate_gradient

__all__ = ["HardProjection", "GradientStep", "Prox", "prox"]

LambdaRule = float | torch.Tensor | Callable[[float], float | torch.Tensor]


def _check_kspace(op: LinearOperator, y: torch.Tensor) -> None:
    shape = getattr(op, "shape", None)
    if shape is not None and tuple(y.shape) != tuple(shape):
        raise InputError(f"measured k-space has shape {tuple(y.shape)}, expected {tuple(shape)} for this operator")


def prox(op: LinearOperator, y: torch.Tensor, x_hat: torch.Tensor, lam: float | torch.Tensor,
         max_iter: int = 20, tol: float = 1e-6) -> torch.Tensor:
    """The regularised least-squares solution ``(AᴴA + λI)⁻¹(Aᴴy + λ x̂₀)``.

    Closed form for :class:`SingleCoil`; otherwise CG warm-started at ``x̂₀``.
    Shape: ``y`` k-space ``(B, C, H, W)``; ``x_hat`` ``(B, 1, H, W)``; ``lam`` float or ``(B,)``;
    returns ``(B, 1, H, W)``.
    """
    lam_t = torch.as_tensor(lam, dtype=x_hat.real.dtype, device=x_hat.device)
    if lam_t.dim() == 1:
        lam_t = lam_t.view(-1, 1, 1, 1)
    if bool((lam_t < 0).any()):
        raise InputError(f"λ must be non-negative, got {lam}")
    if isinstance(op, SingleCoil):
        mask_sq = op.mask * op.mask
        k = (op.mask * y + lam_t * fft2c(x_hat)) / (mask_sq + lam_t).clamp_min(torch.finfo(lam_t.dtype).tiny)
        return ifft2c(k)
    rhs = op.A_adjoint(y) + lam_t * x_hat
    return conjugate_gradient(op.normal, rhs, lam_t.reshape(-1), x0=x_hat, max_iter=max_iter, tol=tol).x


class HardProjection:
    """Replace the sampled k-space of a single-coil estimate by the measurement.

    Maths: ``x ← Fᴴ((1 − M) ⊙ F x + M ⊙ y)`` (the λ → 0 limit of the prox, binary ``M``).
    Shape: ``y`` ``(B, 1, H, W)``; called on ``x`` ``(B, 1, H, W)``.
    """

    def __init__(self, op: SingleCoil, y: torch.Tensor) -> None:
        if not isinstance(op, SingleCoil):
            raise InputError("hard projection needs a single-coil operator; use Prox with a small λ for Sense")
        _check_kspace(op, y)
        self.op, self.y = op, y

    def __call__(self, x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        k = fft2c(x)
        return ifft2c(k + self.op.mask * (self.y - k))


class GradientStep:
    """One gradient step on ``½‖A x − y‖²``: ``x ← x − η Aᴴ(A x − y)``.

    Shape: ``y`` like the operator's k-space; called on ``x`` ``(B, 1, H, W)``.
    """

    def __init__(self, op: LinearOperator, y: torch.Tensor, step: float = 1.0) -> None:
        _check_kspace(op, y)
        self.op, self.y, self.step = op, y, step

    def __call__(self, x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        return x - self.step * self.op.A_adjoint(self.op.A(x) - self.y)


class Prox:
    """The prox data consistency ``x(λ) = (AᴴA + λI)⁻¹(Aᴴy + λ x̂₀)`` applied to the prior's estimate.

    ``lam`` is a number, a per-item tensor ``(B,)``, or a rule ``sigma -> λ`` evaluated at each call;
    it can be changed between calls through :attr:`lam` (the SURE λ-step does this).
    Shape: ``y`` like the operator's k-space; called on ``x_hat`` ``(B, 1, H, W)``.
    """

    def __init__(self, op: LinearOperator, y: torch.Tensor, lam: LambdaRule,
                 max_iter: int = 20, tol: float = 1e-6) -> None:
        if not isinstance(op, (Sense, SingleCoil)):
            raise InputError(f"Prox needs a Sense or SingleCoil operator, got {type(op).__name__}")
        _check_kspace(op, y)
        self.op, self.y, self.lam = op, y, lam
        self.max_iter, self.tol = max_iter, tol

    def __call__(self, x_hat: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        lam = self.lam(sigma) if callable(self.lam) else self.lam
        return prox(self.op, self.y, x_hat, lam, self.max_iter, self.tol)
