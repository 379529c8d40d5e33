"""Noise schedules: geometric VE levels and the VP schedule's VE coordinates."""

from __future__ import annotations

import math

import pytest
import torch

from scores.sde import NoiseSchedule, VESchedule, VPSchedule, build_schedule


def test_ve_sigmas_are_geometric_from_max_to_min() -> None:
    sched = VESchedule(0.01, 50.0)
    s = sched.sigmas(7)
    assert s.shape == (7,) and s.dtype == torch.float64
    assert math.isclose(s[0].item(), 50.0, rel_tol=1e-12) and math.isclose(s[-1].item(), 0.01, rel_tol=1e-12)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.01 / 50.0) ** (1 / 6)), rtol=1e-12, atol=0)
    assert isinstance(sched, NoiseSchedule)


def test_ve_diffusion_is_derivative_of_variance() -> None:
    sched = VESchedule(0.002, 80.0)
    t = torch.linspace(0.05, 0.95, 9, dtype=torch.float64)
    h = 1e-6
    numeric = (sched.sigma(t + h) ** 2 - sched.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(sched.diffusion_squared(t), numeric, rtol=1e-6, atol=0)


def test_vp_sigma_matches_integrated_beta_marginal() -> None:
    """VP marginal x_t = a x0 + sqrt(1 - a^2) z with a = exp(-int beta / 2); VE level sqrt(1 - a^2) / a."""
    sched = VPSchedule(0.1, 20.0)
    t = torch.linspace(0.01, 1.0, 11, dtype=torch.float64)
    grid = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    beta = 0.1 + (20.0 - 0.1) * grid
    cumulative = torch.cumulative_trapezoid(beta, grid)
    integral = torch.cat([torch.zeros(1, dtype=torch.float64), cumulative])[(t * 200_000).round().long()]
    a = torch.exp(-0.5 * integral)
    torch.testing.assert_close(sched.scale(t), a, rtol=1e-8, atol=0)
    torch.testing.assert_close(sched.sigma(t), torch.sqrt(1 - a**2) / a, rtol=1e-7, atol=0)
    s = sched.sigmas(5)
    assert math.isclose(s[0].item(), sched.sigma_max) and math.isclose(s[-1].item(), sched.sigma_min)
    assert torch.all(s[1:] < s[:-1])


def test_build_schedule_and_bad_values() -> None:
    assert isinstance(build_schedule("ve", sigma_min=0.1, sigma_max=2.0), VESchedule)
    assert isinstance(build_schedule("vp"), VPSchedule)
    with pytest.raises(ValueError, match="kind"):
        build_schedule("sub-vp")
    with pytest.raises(ValueError):
        VESchedule(1.0, 0.5)
