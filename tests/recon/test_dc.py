"""Data consistency: the prox solves its normal equations; closed form == CG; limits."""

import pytest
import sigpy
import sigpy.mri
import torch

from recon.dc import GradientStep, HardProjection, Prox, prox
from recon.errors import InputError
from recon.fft import fft2c
from recon.operators import Sense, SingleCoil

DT = torch.complex128


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(coils=6, h=32, w=24, seed=0):
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((coils, h, w))).to(DT)[None]
    cols = (torch.rand(w, generator=_gen(seed)) < 0.3).double()
    cols[w // 2 - 2: w // 2 + 2] = 1
    mask = cols.expand(h, w).clone()
    x_true = torch.randn(1, 1, h, w, dtype=DT, generator=_gen(seed + 1))
    op = Sense(maps, mask)
    y = op.A(x_true) + 0.05 * mask * torch.randn(1, coils, h, w, dtype=DT, generator=_gen(seed + 2))
    x_hat = x_true + 0.3 * torch.randn(1, 1, h, w, dtype=DT, generator=_gen(seed + 3))
    return op, y, x_hat


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_sense_prox_solves_normal_equations(lam):
    op, y, x_hat = _problem()
    x = prox(op, y, x_hat, lam, max_iter=300, tol=1e-12)
    residual = op.normal(x) + lam * x - (op.A_adjoint(y) + lam * x_hat)
    assert torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(op.A_adjoint(y) + lam * x_hat) < 1e-10


@pytest.mark.parametrize("lam", [1e-3, 0.5, 20.0])
def test_single_coil_closed_form_equals_cg_and_normal_equations(lam):
    h, w = 16, 12
    mask = (torch.rand(h, w, generator=_gen(4)) < 0.4).double()
    op = SingleCoil(mask, (2, 1, h, w), DT)
    y = mask * torch.randn(2, 1, h, w, dtype=DT, generator=_gen(5))
    x_hat = torch.randn(2, 1, h, w, dtype=DT, generator=_gen(6))
    closed = prox(op, y, x_hat, lam)
    residual = op.normal(closed) + lam * closed - (op.A_adjoint(y) + lam * x_hat)
    assert float(torch.linalg.vector_norm(residual)) < 1e-10
    as_sense = Sense(torch.ones(2, 1, h, w, dtype=DT), mask)
    torch.testing.assert_close(closed, prox(as_sense, y, x_hat, lam, max_iter=300, tol=1e-13), rtol=1e-9, atol=1e-9)


def test_per_item_lambda_and_limits():
    op, y, x_hat = _problem()
    op2 = Sense(op.sens_maps.expand(2, -1, -1, -1), op.mask)
    y2, xh2 = y.expand(2, -1, -1, -1).clone(), x_hat.expand(2, -1, -1, -1).clone()
    both = prox(op2, y2, xh2, torch.tensor([1e-3, 1e3], dtype=torch.float64), max_iter=300, tol=1e-12)
    torch.testing.assert_close(both[0:1], prox(op, y, x_hat, 1e-3, max_iter=300, tol=1e-12), rtol=1e-8, atol=1e-8)
    # λ → ∞ returns the prior's estimate
    assert torch.linalg.vector_norm(both[1:2] - x_hat) / torch.linalg.vector_norm(x_hat) < 5e-3


def test_hard_projection_is_the_small_lambda_prox_and_keeps_measured_entries():
    h, w = 16, 12
    mask = (torch.rand(h, w, generator=_gen(7)) < 0.4).double()
    op = SingleCoil(mask, (1, 1, h, w), DT)
    y = mask * torch.randn(1, 1, h, w, dtype=DT, generator=_gen(8))
    x_hat = torch.randn(1, 1, h, w, dtype=DT, generator=_gen(9))
    x = HardProjection(op, y)(x_hat, 0.1)
    torch.testing.assert_close(mask * fft2c(x), y, rtol=0, atol=1e-12)
    torch.testing.assert_close((1 - mask) * fft2c(x), (1 - mask) * fft2c(x_hat), rtol=0, atol=1e-12)
    torch.testing.assert_close(x, prox(op, y, x_hat, 1e-12), rtol=0, atol=1e-9)


def test_gradient_step_decreases_the_data_term_and_prox_rule_follows_sigma():
    op, y, x_hat = _problem()
    before = torch.linalg.vector_norm(op.A(x_hat) - y)
    after = torch.linalg.vector_norm(op.A(GradientStep(op, y, step=1.0)(x_hat)) - y)
    assert after < before
    dc = Prox(op, y, lam=lambda s: 10.0 * s, max_iter=300, tol=1e-12)
    torch.testing.assert_close(dc(x_hat, 0.05), prox(op, y, x_hat, 0.5, max_iter=300, tol=1e-12))


def test_dc_rejects_mismatched_kspace():
    op, y, _ = _problem()
    with pytest.raises(InputError, match="expected"):
        Prox(op, y[..., :-1], 0.1)
    with pytest.raises(InputError, match="single-coil"):
        HardProjection(op, y)
