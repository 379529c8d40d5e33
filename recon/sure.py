"""Stein's Unbiased Risk Estimate for the data-consistency weight λ, and the noise level it needs.

Noise convention (DESIGN.md): ``y = A x + n`` on the sampled entries, ``n ~ CN(0, σ²)``, i.e.
``E|n|² = σ²`` and each real component has variance ``σ²/2``. Complex data are treated as pairs
of reals: ``m`` sampled complex entries are ``2m`` real measurements, so for an estimate of the
measurements ``f(y) = A x(λ; y)`` the real-valued SURE with per-component variance ``σ²/2`` reads::

    SURE(λ) = ‖y − f(y)‖² − m σ² + σ² div_y f(y)

is unbiased for ``E‖f(y) − A x_true‖²`` (the measurement-domain risk). With ``x(λ)`` the prox
``(AᴴA + λI)⁻¹(Aᴴy + λ x̂₀)`` and ``x̂₀`` held fixed, ``f`` is affine in ``y``; its divergence
is ``2 Re tr(A (AᴴA + λI)⁻¹ Aᴴ)`` and is estimated with a seeded Monte-Carlo probe ``b``:
``div ≈ Re⟨b, f(y + ε b) − f(y)⟩ / ε``. For single-coil Cartesian everything is closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from recon.dc import prox
from recon.errors import InputError
from recon.fft import fft2c
from recon.operators import LinearOperator, Sense, SingleCoil, conjugate_gradient

__all__ = [
    "estimate_sigma",
    "residual_sigma",
    "sampled_count",
    "complex_normal",
    "probe",
    "probe_divergence",
    "mc_divergence",
    "sure",
    "SureCurve",
    "sure_over_grid",
    "sure_prox",
    "sure_prox_closed_form",
    "LambdaSearch",
    "search_lambda",
]

_MAD_TO_STD = 1.0 / 0.6744897501960817  # σ = MAD / Φ⁻¹(3/4) for a Gaussian


def sampled_count(mask: torch.Tensor, kspace_shape: tuple[int, ...]) -> int:
    """Number ``m`` of measured complex entries of a k-space of this shape."""
    return int(torch.count_nonzero(torch.broadcast_to(mask != 0, kspace_shape)))


def estimate_sigma(kspace: torch.Tensor, mask: torch.Tensor | None = None, outer_fraction: float = 0.15) -> float:
    """Noise level ``σ`` (``E|n|² = σ²``) from the k-space alone, no noise scan needed.

    Estimator: the outermost k-space corners (beyond ``1 − outer_fraction`` of the half-width in
    both directions) hold almost no signal, only noise; when too few of them are sampled, the outer
    columns, then the outer readout rows of the sampled columns, are used. On the sampled entries there, the real and
    imaginary parts are pooled and ``σ = √2 · median(|v − median v|) / 0.6745`` (median absolute
    deviation of one real component, robust to the little signal left). Works on prospectively undersampled data: only
    entries with ``mask ≠ 0`` (or, without a mask, non-zero entries) are used.
    Shape: ``kspace`` ``(..., C, H, W)`` complex; ``mask`` broadcastable to it.
    """
    if not torch.is_complex(kspace) or kspace.dim() < 2:
        raise InputError(f"k-space must be complex with at least 2 dims (..., H, W), got {kspace.dtype} {tuple(kspace.shape)}")
    h, w = kspace.shape[-2:]
    ky = (torch.arange(h, device=kspace.device) - h // 2).abs().view(h, 1) / max(h // 2, 1)
    kx = (torch.arange(w, device=kspace.device) - w // 2).abs().view(1, w) / max(w // 2, 1)
    corner = (ky >= 1 - outer_fraction) & (kx >= 1 - outer_fraction)
    sampled = (kspace != 0) if mask is None else torch.broadcast_to(mask != 0, kspace.shape)
    keep = sampled & corner
    # too few corner samples (1-D masks at high acceleration sample no outer columns): the outer
    # band in W, then the outer readout rows (band in H) of whichever columns were sampled
    for band in (kx >= 1 - 2 * outer_fraction, ky >= 1 - 2 * outer_fraction):
        if int(keep.sum()) >= 16:
            break
        keep = sampled & band
    if int(keep.sum()) < 16:
        raise InputError("cannot estimate the noise level: fewer than 16 sampled k-space entries at the periphery")
    v = torch.view_as_real(kspace[keep]).reshape(-1).double()
    mad = torch.median(torch.abs(v - torch.median(v)))
    return float(mad * _MAD_TO_STD * math.sqrt(2.0))


@torch.no_grad()
def residual_sigma(op: Sense, kspace: torch.Tensor, max_iter: int = 50) -> float | None:
    """σ of the regression fit of the data by the forward model: ``σ² = ‖y − A x_ls‖² / (m − n)``.

    ``x_ls`` is the SENSE least-squares image (CG on ``AᴴA x = Aᴴy``, ``max_iter`` iterations, from zero),
    ``m`` the sampled complex entries, ``n`` the unknowns (pixels where ``Σ_c |S_c|² > 0``). Under the
    model ``y = A x + n`` this is the unbiased noise variance of linear regression; anything the model
    cannot explain (coil maps estimated from a few ACS lines, motion, a wrong mask) adds to it, so the
    ratio to :func:`estimate_sigma`'s σ² measures the model's misfit. A CG stopped early leaves a larger
    residual (σ errs high). Summed over the batch. None when ``m − n < m / 10`` (too few residual
    degrees of freedom, e.g. one coil).
    Shape: ``kspace`` ``(B, C, H, W)`` complex, the operator's shape.
    """
    y = kspace * (op.mask != 0)
    m = sampled_count(op.mask, tuple(y.shape))
    n = int(torch.count_nonzero(op.sens_maps.abs().pow(2).sum(dim=1) > 0))
    if m - n < m / 10:
        return None
    x_ls = conjugate_gradient(op.normal, op.A_adjoint(y), 0.0, max_iter=max_iter, tol=1e-6).x
    residual = float(torch.sum(torch.abs(op.A(x_ls) - y) ** 2))
    return math.sqrt(residual / (m - n))


def complex_normal(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``n₁ + i n₂``, ``n₁, n₂ ~ N(0, 1)``: recon's one random draw (SURE probes, the validation input).

    Drawn on the CPU from ``generator`` and then moved, so a seed gives the same numbers on any device.
    Shape: ``shape``, complex of the real ``dtype``, on ``device``.
    """
    pair = torch.randn(tuple(shape) + (2,), generator=generator, dtype=dtype, device="cpu")
    return torch.view_as_complex(pair).to(device)


def probe(mask: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator,
          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A SURE probe on the sampled entries: ``b = M ⊙ (n₁ + i n₂)``.

    Shape: ``mask`` broadcastable to k-space ``shape``; returns ``shape`` complex.
    """
    return complex_normal(shape, generator, dtype, device) * (mask != 0)


def probe_divergence(b: torch.Tensor, f_y: torch.Tensor, f_probed: torch.Tensor, epsilon: float) -> float:
    """One probe's divergence estimate: ``Re⟨b, f(y + εb) − f(y)⟩ / ε`` (complex as real pairs).

    Shape: the three k-space tensors have one shape.
    """
    return float(torch.sum(b.conj() * (f_probed - f_y)).real) / epsilon


def mc_divergence(f: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, mask: torch.Tensor,
                  generator: torch.Generator, epsilon: float | None = None, probes: int = 1) -> float:
    """Monte-Carlo divergence of ``f`` at ``y`` over the sampled entries, complex as real pairs.

    Maths: ``div f ≈ (1/P) Σ_p Re⟨b_p, f(y + ε b_p) − f(y)⟩ / ε``, ``b_p = M ⊙ (z₁ + i z₂)``
    (:func:`probe`, :func:`probe_divergence`).
    Shape: ``y`` k-space ``(B, C, H, W)``; ``f`` maps it to the same shape.
    """
    if epsilon is None:
        epsilon = 1e-3 * max(float(y.abs().max()), 1e-12)
    fy = f(y)
    total = 0.0
    for _ in range(probes):
        b = probe(mask, tuple(y.shape), generator, y.real.dtype, y.device)
        total += probe_divergence(b, fy, f(y + epsilon * b), epsilon)
    return total / probes


def sure(y: torch.Tensor, fy: torch.Tensor, divergence: float, sigma: float, m: int) -> float:
    """``SURE = ‖y − f(y)‖² − m σ² + σ² div`` over the ``m`` sampled complex entries (``fy`` masked like ``y``)."""
    return float(torch.sum(torch.abs(y - fy) ** 2)) - m * sigma**2 + sigma**2 * divergence


@dataclass
class SureCurve:
    """Result of :func:`sure_over_grid`: the chosen λ, its index in the evaluation order, and
    ``[(λ, SURE(λ))]`` in that order (the grid first, then any refinement points)."""

    lam: float
    index: int
    curve: list[tuple[float, float]]


_GOLDEN = (math.sqrt(5) - 1) / 2


def _golden_log(objective: Callable[[float], float], lo: float, hi: float, tol: float, max_iter: int = 40) -> None:
    """Golden-section search of ``objective(λ)`` on ``log λ ∈ [lo, hi]`` until the bracket is narrower than
    ``tol``; the caller keeps the evaluations (the objective records them)."""
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc, fd = objective(math.exp(c)), objective(math.exp(d))
    for _ in range(max_iter):
        if hi - lo < tol:
            break
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = objective(math.exp(c))
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = objective(math.exp(d))


def sure_over_grid(y: torch.Tensor, b: torch.Tensor, epsilon: float, sigma: float, m: int, grid: Sequence[float],
                   measure: Callable[[float], tuple[torch.Tensor, torch.Tensor]], refine: bool = False,
                   tol: float = 0.1, max_extend: int = 4) -> SureCurve:
    """The λ-step: Monte-Carlo SURE of ``f_λ`` at every grid point, its minimiser, and optionally a
    continuous refinement of it.

    Maths: ``SURE(λ) = ‖y − f_λ(y)‖² − mσ² + σ² Re⟨b, f_λ(y + εb) − f_λ(y)⟩/ε`` (:func:`sure`,
    :func:`probe_divergence`); ties go to the first grid point. ``refine``: while the minimum lies at
    an edge of the evaluated λ, one more point beyond it at the edge's own ratio (at most ``max_extend``);
    then, when the minimum is interior, golden-section search on ``log λ`` between its two neighbours
    until the bracket is narrower than ``tol`` (natural-log units); the result is the smallest SURE evaluated.
    Shape: ``y``, ``b`` k-space ``(B, C, H, W)``; ``measure(λ)`` returns ``(f_λ(y), f_λ(y + εb))``,
    each of that shape; ``measure`` is called once per entry of the returned curve, in its order.
    """
    curve: list[tuple[float, float]] = []

    def value(lam: float) -> float:
        f_y, f_probed = measure(float(lam))
        curve.append((float(lam), sure(y, f_y, probe_divergence(b, f_y, f_probed, epsilon), sigma, m)))
        return curve[-1][1]

    for lam in grid:
        value(lam)

    def best() -> int:
        return min(range(len(curve)), key=lambda j: curve[j][1])

    if refine and len(set(grid)) > 1:
        for _ in range(max_extend):  # a minimum at an edge: step outward at the edge's own spacing
            lams = sorted({lam for lam, _ in curve})
            at = curve[best()][0]
            if at == lams[-1]:
                value(at * lams[-1] / lams[-2])
            elif at == lams[0]:
                value(at * lams[0] / lams[1])
            else:
                break
        lams = sorted({lam for lam, _ in curve})
        rank = lams.index(curve[best()][0])
        if 0 < rank < len(lams) - 1:
            _golden_log(value, math.log(lams[rank - 1]), math.log(lams[rank + 1]), tol)
    index = best()
    return SureCurve(curve[index][0], index, curve)


def sure_prox(op: LinearOperator, y: torch.Tensor, x_hat: torch.Tensor, lam: float, sigma: float,
              generator: torch.Generator, probes: int = 1, max_iter: int = 30, tol: float = 1e-7) -> float:
    """SURE of the prox ``x(λ) = (AᴴA + λI)⁻¹(Aᴴy + λ x̂₀)`` with a Monte-Carlo divergence.

    ``x̂₀`` is held fixed, so ``f(y) = A x(λ; y)`` is affine and its divergence is estimated
    exactly (no finite-difference error) from the linear part ``b ↦ A (AᴴA + λI)⁻¹ Aᴴ b``.
    Shape: ``y`` ``(B, C, H, W)``; ``x_hat`` ``(B, 1, H, W)``.
    """
    mask = op.mask
    m = sampled_count(mask, tuple(y.shape))
    fy = op.A(prox(op, y, x_hat, lam, max_iter, tol))
    zero = torch.zeros_like(x_hat)

    def linear_part(b: torch.Tensor) -> torch.Tensor:
        return op.A(prox(op, b, zero, lam, max_iter, tol))

    div = mc_divergence(lambda b: linear_part(b), torch.zeros_like(y), mask, generator, epsilon=1.0, probes=probes)
    return sure(y, fy, div, sigma, m)


def sure_prox_closed_form(op: SingleCoil, y: torch.Tensor, x_hat: torch.Tensor, lam: float, sigma: float) -> float:
    """Exact SURE of the single-coil Cartesian prox (binary mask).

    Maths: on sampled entries ``f = (y + λ k̂₀)/(1 + λ)`` (divergence ``2m/(1 + λ)`` over real
    pairs), so with ``R = ‖y − M k̂₀‖²`` and ``m`` sampled entries
    ``SURE(λ) = (λ/(1+λ))² R − m σ² + 2 m σ²/(1 + λ)``.
    """
    if not isinstance(op, SingleCoil):
        raise InputError("the closed-form SURE needs a SingleCoil operator")
    m = sampled_count(op.mask, tuple(y.shape))
    r = float(torch.sum(torch.abs(op.mask * (y - fft2c(x_hat))) ** 2))
    return (lam / (1 + lam)) ** 2 * r - m * sigma**2 + 2 * sigma**2 * m / (1 + lam)


@dataclass
class LambdaSearch:
    """Result of :func:`search_lambda`: the chosen λ, its SURE, and every (λ, SURE) evaluated."""

    lam: float
    value: float
    history: list[tuple[float, float]] = field(default_factory=list)


def search_lambda(objective: Callable[[float], float], lam_min: float = 1e-4, lam_max: float = 1e2,
                  grid: int = 7, tol: float = 0.05, max_iter: int = 20) -> LambdaSearch:
    """Minimise ``objective(λ)`` over ``λ ∈ [lam_min, lam_max]`` on a log scale.

    A log-spaced grid brackets the minimum; golden-section search on ``log λ`` then refines it
    until the bracket is narrower than ``tol`` (in natural-log units). Robust to a flat or
    monotone objective (returns the best end of the range).
    """
    if not (0 < lam_min < lam_max) or grid < 3:
        raise InputError(f"need 0 < lam_min < lam_max and grid >= 3, got {lam_min}, {lam_max}, {grid}")
    history: list[tuple[float, float]] = []

    def f(lam: float) -> float:
        value = float(objective(lam))
        history.append((lam, value))
        return value

    lo, hi = math.log(lam_min), math.log(lam_max)
    points = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    values = [f(math.exp(p)) for p in points]
    i = min(range(grid), key=values.__getitem__)
    _golden_log(f, points[max(i - 1, 0)], points[min(i + 1, grid - 1)], tol, max_iter)
    lam, value = min(history, key=lambda t: t[1])
    return LambdaSearch(lam=lam, value=value, history=history)
