"""SURE: MC divergence vs exact Jacobian trace, SURE vs true risk over λ, σ estimates, λ search."""

import math

import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from recon.dc import prox
from recon.errors import InputError
from recon.operators import Sense, SingleCoil
from recon.sure import (
    estimate_sigma,
    mc_divergence,
    probe,
    residual_sigma,
    sampled_count,
    search_lambda,
    sure_over_grid,
    sure_prox,
    sure_prox_closed_form,
)

DT = torch.complex128


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _complex_noise(shape, sigma, seed):
    """CN(0, σ²): E|n|² = σ²."""
    z = torch.randn(shape + (2,), dtype=torch.float64, generator=_gen(seed))
    return sigma / math.sqrt(2) * torch.view_as_complex(z)


def test_mc_divergence_matches_exact_jacobian_trace_of_a_linear_denoiser():
    """For a complex-linear f(y) = W y over real pairs, div f = 2 Re tr W (float64)."""
    n = 24
    w_mat = torch.randn(n, n, dtype=DT, generator=_gen(0)) / math.sqrt(n)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.float64)

    def f(y):
        return (w_mat @ y.reshape(n)).reshape(y.shape)

    y = torch.randn(1, 1, 4, 6, dtype=DT, generator=_gen(1))
    exact = 2 * float(torch.trace(w_mat).real)
    # the real-Jacobian trace computed by autograd agrees with the formula
    jac = torch.autograd.functional.jacobian(lambda v: torch.view_as_real(f(torch.view_as_complex(v))).reshape(-1),
                                             torch.view_as_real(y).contiguous())
    assert abs(float(torch.trace(jac.reshape(2 * n, 2 * n))) - exact) < 1e-10
    est = mc_divergence(f, y, mask, _gen(2), epsilon=1.0, probes=4000)
    assert abs(est - exact) < 0.05 * float(torch.linalg.matrix_norm(w_mat)) * math.sqrt(2 * n) / 2


def test_mc_divergence_of_the_sense_prox_matches_dense_trace():
    h, w, c = 8, 6, 3
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((c, h, w))).to(DT)[None]
    mask = torch.zeros(h, w, dtype=torch.float64)
    mask[:, ::2] = 1
    op, lam = Sense(maps, mask), 0.3
    # dense L = A (AᴴA + λI)⁻¹ Aᴴ, from the columns of A
    n_img, n_k = h * w, c * h * w
    big = Sense(maps.expand(n_img, -1, -1, -1), mask)
    a_mat = big.A(torch.eye(n_img, dtype=DT).reshape(n_img, 1, h, w)).reshape(n_img, n_k).T  # (n_k, n_img)
    l_mat = a_mat @ torch.linalg.solve(a_mat.conj().T @ a_mat + lam * torch.eye(n_img, dtype=DT), a_mat.conj().T)
    exact = 2 * float(torch.trace(l_mat).real)
    m = sampled_count(mask, (1, c, h, w))
    est = mc_divergence(lambda b: op.A(prox(op, b, torch.zeros(1, 1, h, w, dtype=DT), lam, 300, 1e-13)),
                        torch.zeros(1, c, h, w, dtype=DT), mask, _gen(3), epsilon=1.0, probes=200)
    assert abs(est - exact) < 0.08 * exact
    assert 0 < exact < 2 * m


def _phantom(h, w):
    """Shepp-Logan at a finite resolution (Gaussian blur of 1 pixel), as an MR image has."""
    img = torch.from_numpy(np.real(sigpy.shepp_logan((h, w)))).double()[None, None]
    k = torch.exp(-0.5 * torch.arange(-3, 4, dtype=torch.float64) ** 2)
    k = k / k.sum()
    img = torch.nn.functional.conv2d(img, k.view(1, 1, 1, -1), padding=(0, 3))
    img = torch.nn.functional.conv2d(img, k.view(1, 1, -1, 1), padding=(3, 0))
    return img.to(DT)


def _phantom_problem(seed=0, sigma=0.02, h=64, w=48, coils=6):
    img = _phantom(h, w)
    img = img * torch.exp(1j * torch.linspace(0, 1, w, dtype=torch.float64))  # smooth phase
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((coils, h, w))).to(DT)[None]
    cols = (torch.rand(w, generator=_gen(seed)) < 0.3).double()
    cols[w // 2 - 4: w // 2 + 4] = 1
    mask = cols.expand(h, w).clone()
    op = Sense(maps, mask)
    y = op.A(img) + mask * _complex_noise((1, coils, h, w), sigma, seed + 1)
    # a prior estimate with a smooth, structured error
    err = torch.nn.functional.avg_pool2d(torch.randn(1, 2, h, w, dtype=torch.float64, generator=_gen(seed + 2)), 5, 1, 2)
    x_hat = img + 0.5 * torch.view_as_complex(err.permute(0, 2, 3, 1).contiguous())[:, None]
    return op, y, x_hat, img, sigma


def test_sure_tracks_true_risk_and_its_argmin_is_near_the_oracle():
    op, y, x_hat, img, sigma = _phantom_problem()
    lams = np.logspace(-3, 1.5, 10)
    sure_vals, risk = [], []
    for lam in lams:
        sure_vals.append(sure_prox(op, y, x_hat, float(lam), sigma, _gen(7), probes=2, max_iter=200, tol=1e-10))
        risk.append(float(torch.sum(torch.abs(op.A(prox(op, y, x_hat, float(lam), 200, 1e-10)) - op.A(img)) ** 2)))
    sure_vals, risk = np.array(sure_vals), np.array(risk)
    assert np.max(np.abs(sure_vals - risk)) < 0.1 * (risk.max() - risk.min()) + 0.05 * risk.min()
    fine = search_lambda(lambda lam: sure_prox(op, y, x_hat, lam, sigma, _gen(7), probes=2, max_iter=200, tol=1e-10),
                         1e-3, 10 ** 1.5, grid=7)
    oracle = search_lambda(lambda lam: float(torch.sum(torch.abs(op.A(prox(op, y, x_hat, lam, 200, 1e-10)) - op.A(img)) ** 2)),
                           1e-3, 10 ** 1.5, grid=7)
    assert oracle.lam / 2 <= fine.lam <= oracle.lam * 2


def _single_coil_problem(seed: int, error: float, h: int = 32, w: int = 32, sigma: float = 0.05):
    """Shepp-Logan, a random 40 % mask, noise σ and a prior estimate off by ``error``: ``(op, y, x̂, img, mask, σ)``."""
    img = torch.from_numpy(sigpy.shepp_logan((h, w))).to(DT)[None, None]
    mask = (torch.rand(h, w, generator=_gen(seed)) < 0.4).double()
    op = SingleCoil(mask, (1, 1, h, w), DT)
    y = op.A(img) + mask * _complex_noise((1, 1, h, w), sigma, seed + 1)
    x_hat = img + error * torch.randn(1, 1, h, w, dtype=DT, generator=_gen(seed + 2))
    return op, y, x_hat, img, mask, sigma


def test_closed_form_sure_equals_mc_and_true_risk_in_expectation():
    op, y, x_hat, img, mask, sigma = _single_coil_problem(10, 0.05)
    h, w = y.shape[-2:]
    for lam in [0.01, 0.3, 3.0]:
        closed = sure_prox_closed_form(op, y, x_hat, lam, sigma)
        probes = 50
        mc = sure_prox(op, y, x_hat, lam, sigma, _gen(13), probes=probes)
        # Hutchinson's estimate of div = 2m/(1+λ) has std sqrt(4m)/(1+λ) per probe; it enters as σ² div
        m = sampled_count(mask, tuple(y.shape))
        assert abs(closed - mc) < 4 * sigma**2 * math.sqrt(4 * m) / (1 + lam) / math.sqrt(probes)
    # unbiased: averaged over noise draws, SURE equals the true risk
    lam, sures, risks = 0.3, [], []
    for s in range(200):
        ys = op.A(img) + mask * _complex_noise((1, 1, h, w), sigma, 100 + s)
        sures.append(sure_prox_closed_form(op, ys, x_hat, lam, sigma))
        risks.append(float(torch.sum(torch.abs(op.A(prox(op, ys, x_hat, lam)) - op.A(img)) ** 2)))
    diff = np.array(sures) - np.array(risks)
    assert abs(diff.mean()) < 3.5 * diff.std() / np.sqrt(len(diff))
    assert abs(diff.mean()) < 0.02 * np.mean(risks)


@pytest.mark.parametrize("sigma", [0.01, 0.02, 0.08])
def test_sigma_estimate_within_ten_percent(sigma):
    op, y, _, _, _ = _phantom_problem(seed=20, sigma=sigma, h=128, w=96, coils=8)
    est = estimate_sigma(y, op.mask)
    assert abs(est - sigma) < 0.1 * sigma, (est, sigma)
    # prospectively undersampled input: the mask is inferred from zero entries
    assert estimate_sigma(y) == pytest.approx(est)


def test_search_lambda_finds_minimum_of_known_function():
    res = search_lambda(lambda lam: (math.log(lam) - math.log(0.37)) ** 2, 1e-4, 1e2, grid=7, tol=1e-3)
    assert res.lam == pytest.approx(0.37, rel=2e-3)
    edge = search_lambda(lambda lam: lam, 1e-4, 1e2)
    assert edge.lam == pytest.approx(1e-4)
    with pytest.raises(InputError):
        search_lambda(lambda lam: lam, 1.0, 0.1)


def test_sure_over_grid_is_the_closed_form_sure_up_to_the_probe_and_picks_its_minimum():
    """The λ-step's estimator (recon.biasrecon's): on the single-coil prox, whose SURE is known in
    closed form, its curve matches the closed form within the Hutchinson error of one probe per
    problem, averaged over probes, and it returns the minimiser of its own curve."""
    op, y, x_hat, _, mask, sigma = _single_coil_problem(20, 0.3)
    grid, m, eps = (0.01, 0.3, 3.0), sampled_count(mask, tuple(y.shape)), 0.1 * sigma
    closed = [sure_prox_closed_form(op, y, x_hat, lam, sigma) for lam in grid]
    curves = []
    for seed in range(40):
        b = probe(mask, tuple(y.shape), _gen(100 + seed), torch.float64)
        choice = sure_over_grid(y, b, eps, sigma, m, grid,
                                lambda lam: (op.A(prox(op, y, x_hat, lam)), op.A(prox(op, y + eps * b, x_hat, lam))))
        values = [v for _, v in choice.curve]
        assert [lam for lam, _ in choice.curve] == list(grid) and choice.lam == grid[int(np.argmin(values))]
        curves.append(values)
    mean = np.mean(curves, axis=0)
    for lam, mc, exact in zip(grid, mean, closed):
        assert abs(mc - exact) < 4 * sigma**2 * math.sqrt(4 * m) / (1 + lam) / math.sqrt(len(curves)), (lam, mc, exact)


def test_sure_refinement_finds_the_continuous_minimum_between_grid_points():
    """With ``refine``, the λ-step continues between the grid neighbours of its minimum: on the single-coil
    prox its λ lands on the minimiser of the closed-form SURE (to the probe's noise), which a coarse grid misses."""
    op, y, x_hat, _, mask, sigma = _single_coil_problem(20, 0.3)
    m, eps = sampled_count(mask, tuple(y.shape)), 0.1 * sigma
    exact = search_lambda(lambda lam: sure_prox_closed_form(op, y, x_hat, lam, sigma), 1e-3, 1e2, grid=11, tol=1e-4)
    grid = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
    b = probe(mask, tuple(y.shape), _gen(5), torch.float64)
    calls = []

    def measure(lam):
        calls.append(lam)
        return op.A(prox(op, y, x_hat, lam)), op.A(prox(op, y + eps * b, x_hat, lam))

    coarse = sure_over_grid(y, b, eps, sigma, m, grid, measure)
    fine = sure_over_grid(y, b, eps, sigma, m, grid, measure, refine=True, tol=0.01)
    assert [lam for lam, _ in fine.curve[: len(grid)]] == list(grid) and len(fine.curve) > len(grid)
    assert calls[len(grid):] == [lam for lam, _ in fine.curve]  # one measure per curve entry, in order
    assert fine.curve[fine.index][0] == fine.lam and fine.curve[fine.index][1] == min(v for _, v in fine.curve)
    assert abs(math.log(fine.lam / exact.lam)) < abs(math.log(coarse.lam / exact.lam))
    assert abs(math.log(fine.lam / exact.lam)) < 0.2, (fine.lam, exact.lam)


def test_sure_refinement_steps_past_a_grid_edge_to_an_interior_minimum():
    """A grid that stops short of SURE's minimum: with ``refine`` the λ-step extends it outward at the
    edge's spacing until the minimum is interior, then refines; without, it returns the grid's edge."""
    op, y, x_hat, _, mask, sigma = _single_coil_problem(20, 0.3)
    m, eps = sampled_count(mask, tuple(y.shape)), 0.1 * sigma
    exact = search_lambda(lambda lam: sure_prox_closed_form(op, y, x_hat, lam, sigma), 1e-3, 1e2, grid=11, tol=1e-4)
    b = probe(mask, tuple(y.shape), _gen(5), torch.float64)

    def measure(lam):
        return op.A(prox(op, y, x_hat, lam)), op.A(prox(op, y + eps * b, x_hat, lam))

    for grid in ([exact.lam / 30, exact.lam / 10], [exact.lam * 10, exact.lam * 30]):  # below it, above it
        edge = sure_over_grid(y, b, eps, sigma, m, grid, measure)
        assert edge.lam == (grid[-1] if grid[-1] < exact.lam else grid[0])
        fine = sure_over_grid(y, b, eps, sigma, m, grid, measure, refine=True, tol=0.01)
        lams = sorted(lam for lam, _ in fine.curve)
        assert lams[0] < fine.lam < lams[-1]  # interior of what was evaluated
        assert abs(math.log(fine.lam / exact.lam)) < 0.2, (grid, fine.lam, exact.lam)


def test_residual_sigma_is_the_least_squares_residual_of_numpy():
    """σ² = ‖y − A x_ls‖² / (m − n) with x_ls from numpy's dense least squares (float64, converged CG)."""
    h, w, c = 8, 6, 4
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((c, h, w))).to(DT)[None]
    mask = torch.zeros(h, w, dtype=torch.float64)
    mask[:, [0, 1, 3, 4]] = 1
    op = Sense(maps, mask)
    y = op.A(_phantom(h, w)) + mask * _complex_noise((1, c, h, w), 0.05, 7)
    n_img = h * w
    big = Sense(maps.expand(n_img, -1, -1, -1), mask)
    a_mat = big.A(torch.eye(n_img, dtype=DT).reshape(n_img, 1, h, w)).reshape(n_img, -1).T.numpy()
    x_ls, *_ = np.linalg.lstsq(a_mat, y.reshape(-1).numpy(), rcond=None)
    m = sampled_count(mask, (1, c, h, w))
    expected = math.sqrt(float(np.sum(np.abs(a_mat @ x_ls - y.reshape(-1).numpy()) ** 2)) / (m - n_img))
    assert residual_sigma(op, y, max_iter=300) == pytest.approx(expected, rel=1e-4)


def test_residual_sigma_is_the_noise_when_the_model_holds_and_grows_with_a_map_misfit():
    """Exact maps: the regression σ is unbiased for the noise σ. Maps of another coil geometry: the data
    are not explained (χ² > 2), while the corner estimate still sees only the noise."""
    sigma = 0.02
    op, y, _, img, _ = _phantom_problem(seed=4, sigma=sigma, h=96, w=64, coils=8)
    assert residual_sigma(op, y, max_iter=200) == pytest.approx(sigma, rel=0.05)
    wrong = Sense(torch.from_numpy(sigpy.mri.birdcage_maps((8, 96, 64), r=1.0)).to(DT)[None], op.mask)
    misfit = (residual_sigma(wrong, y, max_iter=200) / estimate_sigma(y, op.mask)) ** 2
    assert misfit > 2.0, misfit
    assert estimate_sigma(y, op.mask) == pytest.approx(sigma, rel=0.1)


def test_residual_sigma_needs_residual_degrees_of_freedom():
    """One coil at 2×: fewer measurements than unknowns, no regression σ (None)."""
    op, y, _, _, _ = _phantom_problem(seed=5, coils=1)
    assert residual_sigma(op, y) is None
