"""Samplers against an analytic Gaussian prior whose denoiser (and posterior) are known in closed form.

Prior: each pixel ``x_j = mu_j + sqrt(v) (n_re + i n_im)`` independently (per-real-channel variance ``v``),
so ``D(x, s) = mu + v / (v + s^2) (x - mu)``. Measurements ``y = A x + e`` with a random complex
``A`` (m < d) and per-real-channel noise std ``sn``. Posterior (per-real-channel covariance):
``m_post = mu + v A^H (v A A^H + sn^2 I)^-1 (y - A mu)``, ``C_post = v I - v^2 A^H (v A A^H + sn^2 I)^-1 A``.
Given ``x_s``, the prior of ``x0`` is Gaussian with mean ``D(x_s, s)`` and covariance ``c(s) I``,
``c(s) = v s^2 / (v + s^2)``, so the linear prox ``(A^H A + lam I)^-1 (A^H y + lam D)`` with
``lam = sn^2 / c(s)`` is exactly ``E[x0 | x_s, y]``: the Tweedie -> dc -> renoise sampler then keeps
the posterior mean as its fixed point.
"""

from __future__ import annotations

import math

import pytest
import torch

from scores.samplers import Denoiser, sample_predictor_corrector, sample_tweedie_dc
from scores.sde import VESchedule

H = W = 4
D = H * W
M = 10
V = 0.5
SN = 0.1


class GaussianPrior:
    """Analytic Tweedie denoiser of the independent Gaussian prior described in the module docstring."""

    def __init__(self, mu: torch.Tensor, v: float) -> None:
        self.mu = mu.reshape(1, 1, H, W).to(torch.complex64)
        self.v = v
        self.calls = 0

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.mu + self.v / (self.v + s**2) * (x - self.mu)


def _crandn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.complex(
        torch.randn(*shape, generator=generator, dtype=torch.float64),
        torch.randn(*shape, generator=generator, dtype=torch.float64),
    )


@pytest.fixture(scope="module")
def problem() -> dict:
    g = torch.Generator().manual_seed(0)
    mu = _crandn(D, generator=g)
    A = _crandn(M, D, generator=g) / math.sqrt(2 * D)
    x_true = mu + math.sqrt(V) * _crandn(D, generator=g)
    y = A @ x_true + SN * _crandn(M, generator=g)
    gram = V * A @ A.conj().T + SN**2 * torch.eye(M, dtype=torch.float64)
    post_mean = mu + V * A.conj().T @ torch.linalg.solve(gram, y - A @ mu)
    post_cov = V * torch.eye(D) - V**2 * A.conj().T @ torch.linalg.solve(gram, A)
    post_std = post_cov.diagonal().real.sqrt()
    AhA, Ahy = A.conj().T @ A, A.conj().T @ y

    def dc(x0: torch.Tensor, sigma: float) -> torch.Tensor:
        lam = SN**2 * (V + sigma**2) / (V * sigma**2)
        rhs = Ahy[:, None] + lam * x0.reshape(x0.shape[0], D).to(torch.complex128).T
        sol = torch.linalg.solve(AhA + lam * torch.eye(D, dtype=torch.complex128), rhs)
        return sol.T.reshape(x0.shape).to(torch.complex64)

    return dict(mu=mu, post_mean=post_mean, post_std=post_std, dc=dc)


def _moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = samples.reshape(samples.shape[0], D).to(torch.complex128)
    mean = flat.mean(0)
    per_real_channel_var = (flat - mean).abs().pow(2).mean(0) / 2
    return mean, per_real_channel_var


def test_gaussian_prior_satisfies_protocol(problem: dict) -> None:
    assert isinstance(GaussianPrior(problem["mu"], V), Denoiser)


def test_fast_sampler_deterministic_limit_is_posterior_mean(problem: dict) -> None:
    """eta = 0 from x = 0 is the sampler's mean map; it must land on the closed-form posterior mean."""
    prior = GaussianPrior(problem["mu"], V)
    sigmas = VESchedule(0.01, 1000.0).sigmas(60)
    out = sample_tweedie_dc(
        prior, (1, 1, H, W), sigmas, dc=problem["dc"], eta=0.0, x_init=torch.zeros(1, 1, H, W, dtype=torch.complex64)
    )
    err = (out.reshape(D).to(torch.complex128) - problem["post_mean"]).abs() / problem["post_std"]
    prior_err = (problem["mu"] - problem["post_mean"]).abs() / problem["post_std"]
    assert prior.calls == 60
    assert err.max() < 0.01, err.max()
    assert prior_err.max() > 1.0  # the data move the answer far from the prior mean


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_fast_sampler_sample_mean_matches_posterior_mean(problem: dict, eta: float) -> None:
    n = 2000
    sigmas = VESchedule(0.01, 200.0).sigmas(40)
    samples = sample_tweedie_dc(
        GaussianPrior(problem["mu"], V), (n, 1, H, W), sigmas, dc=problem["dc"], eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    mean, var = _moments(samples)
    z = (mean - problem["post_mean"]).abs() / problem["post_std"] * math.sqrt(n / 2)  # ~ Rayleigh(1) if exact
    assert z.max() < 4.5, z.max()
    if eta == 0.0:
        # deterministic DDIM = Euler steps of the posterior probability-flow ODE: variance nearly exact
        ratio = var / problem["post_std"] ** 2
        assert 0.8 < ratio.min() and ratio.max() < 1.1, (ratio.min(), ratio.max())


def test_fast_sampler_is_seeded_and_calls_callback(problem: dict) -> None:
    prior = GaussianPrior(problem["mu"], V)
    sigmas = VESchedule(0.01, 50.0).sigmas(8)
    steps: list[int] = []
    a = sample_tweedie_dc(prior, (3, 1, H, W), sigmas, generator=torch.Generator().manual_seed(5),
                          callback=lambda i, x, x0: steps.append(i))
    b = sample_tweedie_dc(prior, (3, 1, H, W), sigmas, generator=torch.Generator().manual_seed(5))
    c = sample_tweedie_dc(prior, (3, 1, H, W), sigmas, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert steps == list(range(8))
    with pytest.raises(ValueError):
        sample_tweedie_dc(prior, (1, 1, H, W), [1.0, 2.0])
    with pytest.raises(ValueError):
        sample_tweedie_dc(prior, (1, 1, H, W), [2.0, 1.0], eta=1.5)


@pytest.mark.parametrize("num_corrector_steps", [0, 1])
def test_predictor_corrector_reproduces_prior_moments(problem: dict, num_corrector_steps: int) -> None:
    """Unconditional PC sampling of the Gaussian prior gives its mean and variance."""
    n = 2000
    sigmas = VESchedule(0.01, 50.0).sigmas(150)
    samples = sample_predictor_corrector(
        GaussianPrior(problem["mu"], V), (n, 1, H, W), sigmas, num_corrector_steps=num_corrector_steps,
        snr=0.05, generator=torch.Generator().manual_seed(2),
    )
    mean, var = _moments(samples)
    z = (mean - problem["mu"]).abs() / math.sqrt(V) * math.sqrt(n / 2)
    assert z.max() < 4.5, z.max()
    ratio = var / V
    assert 0.85 < ratio.min() and ratio.max() < 1.15, (ratio.min(), ratio.max())


def test_predictor_corrector_applies_dc_to_iterate(problem: dict) -> None:
    """A hard projection onto measured pixels holds exactly in the output, and dc never sees sigma = 0."""
    mask = torch.zeros(1, 1, H, W, dtype=torch.bool)
    mask[..., ::2, :] = True
    target = torch.full((1, 1, H, W), 0.3 - 0.2j, dtype=torch.complex64)
    seen: list[float] = []

    def project(x: torch.Tensor, sigma: float) -> torch.Tensor:
        seen.append(sigma)
        return torch.where(mask, target, x)

    out = sample_predictor_corrector(
        GaussianPrior(problem["mu"], V), (4, 1, H, W), VESchedule(0.01, 20.0).sigmas(10), dc=project,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(out[mask.expand_as(out)], target.expand_as(out)[mask.expand_as(out)])
    assert min(seen) > 0 and len(seen) == 20


def test_fast_sampler_clean_start_and_common_random_numbers(problem: dict) -> None:
    """``x_start`` is renoised to ``sigmas[0]`` with the sampler's first draw (the same as passing that
    iterate as ``x_init``), and ``copies`` stacked copies of a batch receive the same noise."""
    prior = GaussianPrior(problem["mu"], V)
    sigmas = VESchedule(0.01, 5.0).sigmas(6)
    start = torch.full((2, 1, H, W), 0.3 + 0.1j, dtype=torch.complex64)
    from_start = sample_tweedie_dc(prior, (2, 1, H, W), sigmas, x_start=start,
                                   generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x_init = start + float(sigmas[0]) * torch.view_as_complex(torch.randn(2, 1, H, W, 2, generator=g))
    rest = sample_tweedie_dc(prior, (2, 1, H, W), sigmas, x_init=x_init, generator=g)
    torch.testing.assert_close(from_start, rest, rtol=0, atol=0)
    twice = sample_tweedie_dc(prior, (4, 1, H, W), sigmas, x_start=start.repeat(2, 1, 1, 1), copies=2,
                              generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(twice[:2], twice[2:], rtol=0, atol=0)
    torch.testing.assert_close(twice[:2], from_start, rtol=0, atol=0)  # the draws of the 2-image batch
    assert not torch.equal(twice[0], twice[1])  # but fresh noise per image within a copy
    with pytest.raises(ValueError, match="copies"):
        sample_tweedie_dc(prior, (3, 1, H, W), sigmas, x_start=torch.zeros(3, 1, H, W, dtype=torch.complex64),
                          copies=2)
