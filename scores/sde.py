"""Noise schedules of the diffusion prior, expressed as variance-exploding (VE) noise levels.

Every schedule is used through its VE noise level ``sigma(t)``: the noisy image is
``x = x0 + sigma * z`` with ``z = n_re + i n_im``, ``n_re, n_im ~ N(0, 1)`` (per-real-channel
standard deviation ``sigma``). A variance-preserving (VP) diffusion ``x_t = a(t) x0 + sqrt(1 - a(t)^2) z``
is the VE diffusion of ``x_t / a(t)`` with ``sigma(t) = sqrt(1 - a(t)^2) / a(t)`` (Karras et al. 2022,
"EDM", Sec. 3), so the samplers and the denoiser only ever see VE noise levels.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["geometric_levels", "NoiseSchedule", "VESchedule", "VPSchedule", "build_schedule"]


def geometric_levels(start: float, end: float, count: int) -> list[float]:
    """The sampler's noise levels: ``count`` geometric levels from ``start`` down to ``end``.

    Maths: ``s_i = start · r^i``, ``r = (end / start)^(1 / (count − 1))``, ``i = 0 … count − 1``;
    one level is ``[end]`` (a single denoising at the lowest level).
    Shape: a list of ``count`` Python floats, decreasing.
    """
    if count < 1 or not (start > end > 0):
        raise ValueError(f"geometric_levels expects count >= 1 and start > end > 0, got {count}, {start}, {end}.")
    if count == 1:
        return [end]
    ratio = (end / start) ** (1 / (count - 1))
    return [start * ratio**i for i in range(count)]


@runtime_checkable
class NoiseSchedule(Protocol):
    """A map from diffusion time ``t in [0, 1]`` to a VE noise level ``sigma(t)``, increasing in ``t``."""

    sigma_min: float
    sigma_max: float

    def sigma(self, t: Tensor) -> Tensor:
        """VE noise level at time ``t``; any shape, float64 recommended."""
        ...

    def sigmas(self, num_steps: int) -> Tensor:
        """Decreasing sampling levels ``sigma_max .. sigma_min``; shape ``(num_steps,)``, float64."""
        ...


class VESchedule:
    """Geometric VE schedule of Song et al. (2021).

    Maths: ``sigma(t) = sigma_min * (sigma_max / sigma_min) ** t``, ``t in [0, 1]``;
    the forward SDE is ``dx = g(t) dw`` with ``g(t)^2 = d sigma^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min)``.

    Args:
        sigma_min: smallest noise level (per real channel), > 0.
        sigma_max: largest noise level, > sigma_min; at least the largest distance between
            training images so that ``sigma_max * z`` covers the data.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not (0.0 < sigma_min < sigma_max):
            raise ValueError(f"VESchedule expects 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        """Noise level ``sigma(t)``; shape of ``t``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def diffusion_squared(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient ``g(t)^2 = 2 sigma(t)^2 log(sigma_max / sigma_min)``; shape of ``t``."""
        return 2.0 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def sigmas(self, num_steps: int) -> Tensor:
        """Geometric sampling levels from ``sigma_max`` down to ``sigma_min``; shape ``(num_steps,)``, float64."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if num_steps == 1:
            return torch.tensor([self.sigma_max], dtype=torch.float64)
        return torch.tensor(geometric_levels(self.sigma_max, self.sigma_min, num_steps), dtype=torch.float64)

    def __repr__(self) -> str:
        return f"VESchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class VPSchedule:
    """Linear-beta VP schedule of Ho et al. / Song et al., in its VE coordinates.

    Maths: ``a(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2) / 2)``,
    ``sigma(t) = sqrt(1 - a^2) / a = sqrt(exp(beta_min t + (beta_max - beta_min) t^2 / 2) - 1)``,
    ``t in [t_min, 1]``.

    Args:
        beta_min: beta at ``t = 0``.
        beta_max: beta at ``t = 1``.
        t_min: smallest time used (VP's ``sigma(0) = 0``, so sampling stops at ``t_min``).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        if not (0.0 <= beta_min < beta_max) or not (0.0 < t_min < 1.0):
            raise ValueError(
                f"VPSchedule expects 0 <= beta_min < beta_max and 0 < t_min < 1, got {beta_min}, {beta_max}, {t_min}."
            )
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.t_min = float(t_min)
        self.sigma_min = float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def integrated_beta(self, t: Tensor) -> Tensor:
        """``int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2``; shape of ``t``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def scale(self, t: Tensor) -> Tensor:
        """Signal scale ``a(t) = exp(-int beta / 2)``; shape of ``t``."""
        return torch.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Equivalent VE noise level ``sqrt(exp(int beta) - 1)``; shape of ``t``."""
        return torch.sqrt(torch.expm1(self.integrated_beta(t)))

    def sigmas(self, num_steps: int) -> Tensor:
        """Levels at uniform times from 1 down to ``t_min``; shape ``(num_steps,)``, float64."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if num_steps == 1:
            return torch.tensor([self.sigma_max], dtype=torch.float64)
        return self.sigma(torch.linspace(1.0, self.t_min, num_steps, dtype=torch.float64))

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"


def build_schedule(
    kind: str,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    t_min: float = 1e-3,
) -> VESchedule | VPSchedule:
    """Make the schedule named ``kind`` ("ve" or "vp") from typed arguments.

    Maths: see :class:`VESchedule` and :class:`VPSchedule`.
    Shape: not applicable (returns a schedule object).
    """
    if kind == "ve":
        return VESchedule(sigma_min, sigma_max)
    if kind == "vp":
        return VPSchedule(beta_min, beta_max, t_min)
    raise ValueError(f"Unknown noise schedule kind {kind!r}; expected 've' or 'vp'.")
