"""Reverse-diffusion samplers that take a data-consistency callable.

Both samplers accept any object with ``denoise(x, sigma)`` (the :class:`Denoiser` protocol: a
ScoreModel, an analytic Gaussian prior, a fastMRI U-Net wrapper, ...) and an optional
data-consistency callable ``dc(x, sigma) -> x`` through which recon/ plugs its operators in;
``dc=None`` samples unconditionally. Noise levels are VE levels (per-real-channel std, see
scores.sde) given as a decreasing sequence, e.g. ``VESchedule(...).sigmas(50)``.

The loops run under ``torch.no_grad()``; a callback that needs gradients must open
``torch.enable_grad()`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm import tqdm  # plain bars: tqdm.auto asks notebooks for ipywidgets (IProgress)

from scores.model import complex_noise, score_from_denoised
from scores.sde import geometric_levels

__all__ = [
    "Denoiser",
    "DataConsistency",
    "Callback",
    "sample_tweedie_dc",
    "TweedieSampler",
    "sample_predictor_corrector",
]


@runtime_checkable
class Denoiser(Protocol):
    """Anything with an MMSE denoiser ``D(x, sigma) ~ E[x0 | x0 + sigma z = x]``.

    Shape: complex ``(B, 1, H, W)`` in and out; ``sigma`` a float or ``(B,)``.
    """

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor: ...


DataConsistency = Callable[[Tensor, float], Tensor]
"""``dc(x, sigma) -> x'``: make a complex ``(B, 1, H, W)`` image consistent with the measurements."""

Callback = Callable[[int, Tensor, Tensor], None]
"""``callback(step, x, x0)``: called after every step with the iterate and the current clean estimate."""


def _as_sigmas(sigmas: Sequence[float] | Tensor) -> list[float]:
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not values:
        raise ValueError("sigmas must hold at least one noise level.")
    if any(s <= 0 for s in values) or any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError("sigmas must be positive and strictly decreasing.")
    return values


def _noise(shape: Sequence[int], generator: torch.Generator | None, device, copies: int = 1) -> Tensor:
    """Complex standard noise of ``shape``; with ``copies > 1`` the batch is ``copies`` stacked copies
    of ``B / copies`` images that receive the same draw (common random numbers)."""
    shape = tuple(shape)
    if copies < 1 or shape[0] % copies:
        raise ValueError(f"copies must divide the batch {shape[0]}, got {copies}.")
    draw = complex_noise((shape[0] // copies, *shape[1:]), generator, device)
    return draw.repeat(copies, *([1] * (len(shape) - 1)))


def _initial(
    shape: Sequence[int], sigma0: float, x_init: Tensor | None, x_start: Tensor | None,
    generator: torch.Generator | None, device, copies: int = 1,
) -> Tensor:
    if x_init is not None and x_start is not None:
        raise ValueError("give x_init (an iterate at sigmas[0]) or x_start (a clean start), not both.")
    if x_init is not None:
        return x_init.to(device=device, dtype=torch.complex64).clone()
    if x_start is None:
        return sigma0 * _noise(shape, generator, device, copies)
    return x_start + sigma0 * _noise(shape, generator, x_start.device, copies)


@torch.no_grad()
def sample_tweedie_dc(
    prior: Denoiser,
    shape: Sequence[int],
    sigmas: Sequence[float] | Tensor,
    *,
    dc: DataConsistency | None = None,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_init: Tensor | None = None,
    x_start: Tensor | None = None,
    copies: int = 1,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Fast sampler: Tweedie estimate -> data consistency -> renoise (DDS / DiffPIR style).

    The project's one denoise → data consistency → renoise loop: BiasRecon's x-steps
    (``recon.biasrecon``, through :class:`TweedieSampler`) run it too. One network evaluation per
    level, so ``len(sigmas) <= 100`` evaluations in total.

    Maths: ``x = sigma_0 z`` (or ``x_init``, or ``x_start + sigma_0 z``); for each level ``s_i``:
    ``x0 = dc(D(x, s_i), s_i)``; ``eps = (x - x0) / s_i``;
    ``x <- x0 + s_{i+1} (sqrt(1 - eta^2) eps + eta z)``, ``z`` fresh complex noise.
    ``eta = 1`` renoises with fresh noise (DDS / DiffPIR), ``eta = 0`` is the deterministic DDIM
    (probability-flow Euler) step. The last clean estimate ``x0`` is returned.
    Shape: ``shape = (B, 1, H, W)``; returns complex64 ``(B, 1, H, W)``.

    Args:
        prior: object with ``denoise(x, sigma)``.
        shape: ``(B, 1, H, W)`` of the images to sample.
        sigmas: strictly decreasing positive noise levels.
        dc: data consistency applied to each Tweedie estimate; None for unconditional sampling.
        eta: share of fresh noise in the renoising step, in [0, 1].
        generator: source of all noise (seeded by the caller; draws are made on its device).
        device: device of the samples.
        x_init: starting iterate at noise level ``sigmas[0]`` instead of ``sigmas[0] * z``.
        x_start: a clean starting estimate (e.g. SENSE), renoised to ``sigmas[0]``: ``x_start + sigmas[0] z``.
        copies: the batch is ``copies`` stacked copies of ``B / copies`` images that share every noise
            draw (common random numbers, e.g. a finite-difference probe pushed through the sampler).
        progress: show a tqdm bar.
        callback: ``callback(step, x, x0)`` after every step.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")
    levels = _as_sigmas(sigmas)
    x = _initial(shape, levels[0], x_init, x_start, generator, device, copies)
    x0 = x
    for i in tqdm(range(len(levels)), desc="sampling", disable=not progress, leave=False):
        s = levels[i]
        x0 = prior.denoise(x, s)
        if dc is not None:
            x0 = dc(x0, s)
        if i + 1 < len(levels):
            s_next = levels[i + 1]
            noise = _noise(x.shape, generator, x.device, copies) if eta > 0 else 0.0
            eps = (x - x0) / s
            x = x0 + s_next * (math.sqrt(1.0 - eta**2) * eps + eta * noise)
        else:
            x = x0
        if callback is not None:
            callback(i, x, x0)
    return x0


class TweedieSampler:
    """:func:`sample_tweedie_dc` with its noise levels (:func:`scores.sde.geometric_levels`), as one object.

    This is what the scripts hand to ``recon.biasrecon.BiasRecon`` (its ``Sampler`` protocol): the
    optimizer asks it for the levels and runs its loop, instead of having a loop of its own.
    Shape: as :func:`sample_tweedie_dc`.
    """

    @staticmethod
    def levels(start: float, end: float, count: int) -> list[float]:
        """``count`` geometric levels from ``start`` to ``end`` (:func:`scores.sde.geometric_levels`)."""
        return geometric_levels(start, end, count)

    def __call__(self, denoiser: Denoiser, shape: Sequence[int], sigmas: Sequence[float] | Tensor,
                 **options: object) -> Tensor:
        """:func:`sample_tweedie_dc` with the same arguments."""
        return sample_tweedie_dc(denoiser, shape, sigmas, **options)  # type: ignore[arg-type]


@torch.no_grad()
def sample_predictor_corrector(
    prior: Denoiser,
    shape: Sequence[int],
    sigmas: Sequence[float] | Tensor,
    *,
    dc: DataConsistency | None = None,
    snr: float = 0.16,
    num_corrector_steps: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_init: Tensor | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Predictor-corrector sampler (Song et al. 2021; score-MRI, Chung & Ye 2022) with dc on the iterate.

    Maths, for levels ``s_0 > ... > s_{N-1}`` and ``s_N = 0``, score ``S = (D(x, s) - x) / s^2``:
    corrector (Langevin, ``num_corrector_steps`` times at ``s_i``):
    ``e = 2 (snr |z| / |S|)^2``, ``x <- dc(x + e S + sqrt(2 e) z, s_i)``;
    predictor (reverse diffusion): ``m = x + (s_i^2 - s_{i+1}^2) S(x, s_i)``,
    ``x <- dc(m + sqrt(s_i^2 - s_{i+1}^2) z, s_{i+1})``. The last predictor (``s_N = 0``) is the
    noise-free Tweedie estimate ``D(x, s_{N-1})``; it is made consistent with ``dc(., s_{N-1})``
    (the level it was estimated at) and returned.
    Norms are per sample over real and imaginary parts.
    Shape: ``shape = (B, 1, H, W)``; returns complex64 ``(B, 1, H, W)``.

    Args:
        prior: object with ``denoise(x, sigma)``.
        shape: ``(B, 1, H, W)``.
        sigmas: strictly decreasing positive noise levels.
        dc: data consistency applied to the iterate after every corrector and predictor step
            (called with the iterate's noise level; never with 0).
        snr: Langevin signal-to-noise ratio of the corrector (0.16 for VE in Song et al.).
        num_corrector_steps: Langevin steps per level (0 gives the plain reverse-diffusion sampler).
        generator: source of all noise.
        device: device of the samples.
        x_init: starting iterate at level ``sigmas[0]``.
        progress: show a tqdm bar.
        callback: ``callback(step, x, x0)`` after every level with ``x0 = m``, the mean of the predictor.
    """
    levels = _as_sigmas(sigmas)
    x = _initial(shape, levels[0], x_init, None, generator, device)
    batch = x.shape[0]

    def norms(v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(torch.view_as_real(v).reshape(batch, -1), dim=1)[:, None, None, None]

    mean = x
    for i in tqdm(range(len(levels)), desc="sampling", disable=not progress, leave=False):
        s = levels[i]
        for _ in range(num_corrector_steps):
            grad = score_from_denoised(prior.denoise(x, s), x, s)
            z = complex_noise(x.shape, generator, x.device)
            step = 2.0 * (snr * norms(z) / norms(grad).clamp_min(1e-12)) ** 2
            x = x + step * grad + torch.sqrt(2.0 * step) * z
            if dc is not None:
                x = dc(x, s)
        s_next = levels[i + 1] if i + 1 < len(levels) else 0.0
        variance = s**2 - s_next**2
        mean = x + variance * score_from_denoised(prior.denoise(x, s), x, s)
        if s_next > 0:
            x = mean + math.sqrt(variance) * complex_noise(x.shape, generator, x.device)
        else:
            x = mean
        if dc is not None:
            x = dc(x, s_next if s_next > 0 else s)
        if callback is not None:
            callback(i, x, mean)
    return x
