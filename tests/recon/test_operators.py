"""One registry of every operator, run through the same float64 checks (STYLE.md, principle 4)."""

from __future__ import annotations

import numpy as np
import pytest
import sigpy as sp
import sigpy.mri
import torch

from recon.errors import InputError
from recon.fft import fft2c, ifft2c
from recon.operators import (
    CoilExpansion,
    Diagonal,
    Fourier,
    LinearOperator,
    Sense,
    SingleCoil,
    conjugate_gradient,
    inner,
)

DT = torch.complex128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _maps(b, c, h, w, seed=0):
    return torch.randn(b, c, h, w, dtype=DT, generator=_gen(seed))


def _mask_1d(h, w, seed=1):
    cols = (torch.rand(w, generator=_gen(seed)) < 0.4).double()
    cols[w // 2 - 1: w // 2 + 2] = 1
    return cols.expand(h, w).clone()


def _mask_2d(h, w, seed=2):
    m = (torch.rand(h, w, generator=_gen(seed)) < 0.35).double()
    m[h // 2, w // 2] = 1
    return m


# name -> (operator factory, image shape, k-space shape)
REGISTRY = {
    "fourier": (lambda d: Fourier(), (2, 3, 8, 6), (2, 3, 8, 6)),
    "fourier_odd": (lambda d: Fourier(), (2, 1, 7, 5), (2, 1, 7, 5)),
    "diagonal": (lambda d: Diagonal(torch.randn(1, 1, 8, 6, dtype=DT, generator=_gen(3)).to(d)), (2, 1, 8, 6), (2, 1, 8, 6)),
    "coil_expansion": (lambda d: CoilExpansion(_maps(2, 4, 8, 6).to(d)), (2, 1, 8, 6), (2, 4, 8, 6)),
    "single_coil_1d": (lambda d: SingleCoil(_mask_1d(8, 6).to(d), (2, 1, 8, 6), DT, d), (2, 1, 8, 6), (2, 1, 8, 6)),
    "single_coil_odd": (lambda d: SingleCoil(_mask_2d(7, 9).to(d), (1, 1, 7, 9), DT, d), (1, 1, 7, 9), (1, 1, 7, 9)),
    "sense_1d_even": (lambda d: Sense(_maps(2, 4, 8, 6).to(d), _mask_1d(8, 6).to(d)), (2, 1, 8, 6), (2, 4, 8, 6)),
    "sense_2d_even": (lambda d: Sense(_maps(2, 4, 10, 12).to(d), _mask_2d(10, 12).to(d)), (2, 1, 10, 12), (2, 4, 10, 12)),
    "sense_signflip": (lambda d: Sense(_maps(1, 3, 6, 8).to(d), _mask_2d(6, 8).to(d)), (1, 1, 6, 8), (1, 3, 6, 8)),
    "sense_fused": (
        lambda d: Sense(_maps(2, 4, 8, 6).to(d), _mask_2d(8, 6).to(d), fused=True), (2, 1, 8, 6), (2, 4, 8, 6)
    ),
    "sense_odd": (lambda d: Sense(_maps(2, 3, 9, 7).to(d), _mask_2d(9, 7).to(d)), (2, 1, 9, 7), (2, 3, 9, 7)),
    "sense_mask_w": (lambda d: Sense(_maps(1, 2, 8, 10).to(d), _mask_1d(8, 10)[0].to(d)), (1, 1, 8, 10), (1, 2, 8, 10)),
    "sense_mask_full": (
        lambda d: Sense(_maps(2, 3, 8, 6).to(d), torch.stack([_mask_2d(8, 6, 5), _mask_2d(8, 6, 6)])[:, None].to(d)),
        (2, 1, 8, 6),
        (2, 3, 8, 6),
    ),
    "composition": (
        lambda d: Diagonal(_mask_2d(8, 6).to(d)) @ Fourier() @ CoilExpansion(_maps(2, 3, 8, 6).to(d)),
        (2, 1, 8, 6),
        (2, 3, 8, 6),
    ),
    "adjoint_view": (lambda d: Sense(_maps(1, 3, 8, 6).to(d), _mask_2d(8, 6).to(d)).H, (1, 3, 8, 6), (1, 1, 8, 6)),
}

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])


@pytest.fixture(params=["cpu", CUDA])
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=sorted(REGISTRY))
def case(request, device):
    factory, ishape, oshape = REGISTRY[request.param]
    return factory(device), ishape, oshape


_DEVICE = {"current": "cpu"}


def _rand(shape, seed):
    return torch.randn(shape, dtype=DT, generator=_gen(seed)).to(_DEVICE["current"])


@pytest.fixture(autouse=True)
def _random_on_device(request):
    """Random test vectors follow the operator's device for the registry checks."""
    _DEVICE["current"] = str(request.getfixturevalue("device")) if "device" in request.fixturenames else "cpu"
    yield
    _DEVICE["current"] = "cpu"


def test_adjointness(case):
    op, ishape, oshape = case
    x, y = _rand(ishape, 10), _rand(oshape, 11)
    lhs = torch.sum(op.A(x).conj() * y)
    rhs = torch.sum(x.conj() * op.A_adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_linearity(case):
    op, ishape, _ = case
    x1, x2 = _rand(ishape, 12), _rand(ishape, 13)
    a, b = 0.7 - 1.3j, -2.1 + 0.4j
    torch.testing.assert_close(op.A(a * x1 + b * x2), a * op.A(x1) + b * op.A(x2), rtol=1e-12, atol=1e-12)


def test_normal_equals_adjoint_of_forward(case):
    op, ishape, _ = case
    x = _rand(ishape, 14)
    torch.testing.assert_close(op.normal(x), op.A_adjoint(op.A(x)), rtol=1e-12, atol=1e-12)


def test_autograd_adjoint(case):
    """∇_x ½‖A x − y‖² at x = 0 equals −Aᴴ y, and the vjp of A equals A_adjoint."""
    op, ishape, oshape = case
    x = torch.zeros(ishape, dtype=DT, device=_DEVICE["current"], requires_grad=True)
    y = _rand(oshape, 15)
    (0.5 * torch.sum(torch.abs(op.A(x) - y) ** 2)).backward()
    torch.testing.assert_close(x.grad, -op.A_adjoint(y), rtol=1e-12, atol=1e-12)
    x2 = _rand(ishape, 16).requires_grad_(True)
    (vjp,) = torch.autograd.grad(op.A(x2), x2, grad_outputs=y)
    torch.testing.assert_close(vjp, op.A_adjoint(y), rtol=1e-12, atol=1e-12)


def test_sense_equals_explicit_formula_and_sigpy():
    b, c, h, w = 1, 5, 16, 12
    maps, mask = _maps(b, c, h, w, 20), _mask_1d(h, w, 21)
    x = _rand((b, 1, h, w), 22)
    op = Sense(maps, mask)
    torch.testing.assert_close(op.A(x), mask * fft2c(maps * x), rtol=1e-12, atol=1e-12)
    ref = sigpy.mri.linop.Sense(maps[0].numpy(), weights=mask.numpy())  # weights enter as sqrt(w) = mask
    np.testing.assert_allclose(op.A(x)[0].numpy(), ref * x[0, 0].numpy(), rtol=0, atol=1e-12)
    y = _rand((b, c, h, w), 23) * mask
    np.testing.assert_allclose(op.A_adjoint(y)[0, 0].numpy(), ref.H * y[0].numpy(), rtol=0, atol=1e-12)


def test_sense_odd_size_equals_sigpy():
    maps, mask = _maps(1, 3, 9, 7, 24), _mask_2d(9, 7, 25)
    x = _rand((1, 1, 9, 7), 26)
    ref = sigpy.mri.linop.Sense(maps[0].numpy(), weights=mask.numpy())
    np.testing.assert_allclose(Sense(maps, mask).A(x)[0].numpy(), ref * x[0, 0].numpy(), rtol=0, atol=1e-12)


def test_fused_coil_reduction_equals_eager():
    maps, mask = _maps(2, 4, 8, 6, 40), _mask_1d(8, 6, 41)
    x, y = _rand((2, 1, 8, 6), 42), _rand((2, 4, 8, 6), 43)
    eager, fused = Sense(maps, mask, fused=False), Sense(maps, mask, fused=True)
    assert not eager.fused and fused.fused
    torch.testing.assert_close(fused.A_adjoint(y), eager.A_adjoint(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.normal(x), eager.normal(x), rtol=1e-12, atol=1e-12)


def test_single_coil_is_masked_fft():
    mask = _mask_2d(8, 6)
    x = _rand((2, 1, 8, 6), 27)
    op = SingleCoil(mask, (2, 1, 8, 6), DT)
    torch.testing.assert_close(op.A(x), mask * fft2c(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.normal(x), ifft2c(mask * fft2c(x)), rtol=1e-12, atol=1e-12)


def test_operator_is_immutable():
    maps, mask = _maps(1, 2, 8, 6), _mask_2d(8, 6)
    op = Sense(maps, mask)
    x = _rand((1, 1, 8, 6), 28)
    before = op.A(x)
    maps.mul_(3)
    mask.zero_()
    torch.testing.assert_close(op.A(x), before, rtol=0, atol=0)


def test_cg_reaches_tolerance_and_solves_the_system():
    b, c, h, w = 3, 4, 16, 12
    op = Sense(_maps(b, c, h, w, 30), _mask_1d(h, w, 31))
    rhs = _rand((b, 1, h, w), 32)
    lam = torch.tensor([1e-2, 1e-1, 1.0], dtype=torch.float64)
    res = conjugate_gradient(op.normal, rhs, lam, max_iter=500, tol=1e-10)
    assert bool((res.residual <= 1e-10).all()) and res.iterations < 500
    true_res = op.normal(res.x) + lam.view(-1, 1, 1, 1) * res.x - rhs
    rel = inner(true_res, true_res).real.sqrt() / inner(rhs, rhs).real.sqrt()
    assert bool((rel < 1e-9).all())
    # the dense solve of one item agrees
    n = h * w
    cols = torch.eye(n, dtype=DT).reshape(n, 1, h, w)
    first = Sense(op.sens_maps[:1].expand(n, -1, -1, -1), op.mask)
    dense = first.normal(cols).reshape(n, n).T + lam[0] * torch.eye(n, dtype=DT)
    ref = torch.linalg.solve(dense, rhs[0].reshape(n))
    torch.testing.assert_close(res.x[0].reshape(n), ref, rtol=1e-8, atol=1e-8)


def test_cg_with_warm_start_and_scalar_lambda():
    op = Sense(_maps(2, 3, 8, 6, 33), _mask_2d(8, 6, 34))
    rhs = _rand((2, 1, 8, 6), 35)
    cold = conjugate_gradient(op.normal, rhs, 0.5, max_iter=200, tol=1e-12)
    warm = conjugate_gradient(op.normal, rhs, 0.5, x0=cold.x, max_iter=200, tol=1e-8)
    assert warm.iterations == 0
    torch.testing.assert_close(warm.x, cold.x)


@pytest.mark.parametrize(
    "maps,mask,match",
    [
        (torch.ones(1, 2, 8, 6), torch.ones(8, 6), "complex"),
        (torch.ones(2, 8, 6, dtype=DT), torch.ones(8, 6), r"\(batch, coils, H, W\)"),
        (torch.ones(1, 2, 8, 6, dtype=DT), torch.ones(7, 6), "does not broadcast"),
        (torch.ones(1, 2, 8, 6, dtype=DT), torch.zeros(8, 6), "all zero"),
        (torch.ones(1, 2, 8, 6, dtype=DT), torch.full((8, 6), float("nan")), "NaN"),
    ],
)
def test_sense_rejects_bad_input(maps, mask, match):
    with pytest.raises(InputError, match=match):
        Sense(maps, mask)


def test_sense_rejects_wrong_image_shape():
    op = Sense(_maps(1, 2, 8, 6), _mask_2d(8, 6))
    with pytest.raises(InputError, match=r"\(1, 1, 8, 6\)"):
        op.A(torch.zeros(1, 1, 6, 8, dtype=DT))


def test_registry_covers_every_operator():
    import recon.operators as ops

    classes = {v for v in vars(ops).values() if isinstance(v, type) and issubclass(v, LinearOperator)}
    used = set()
    for factory, _, _ in REGISTRY.values():
        op = factory("cpu")
        stack = [op]
        while stack:
            o = stack.pop()
            used.add(type(o))
            stack += [getattr(o, k) for k in ("outer", "inner", "op") if isinstance(getattr(o, k, None), LinearOperator)]
    assert classes - {LinearOperator} <= used


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("mask_kind", ["1d", "2d"])
@pytest.mark.parametrize("b,c,h,w", [(2, 15, 64, 48), (1, 15, 640, 368), (1, 4, 33, 31)])
def test_cuda_complex64_matches_cpu_float64(mask_kind, b, c, h, w):
    """The CUDA operators (fused coil combination, checkerboard folding) in complex64 agree with
    the CPU float64 reference to float32 precision."""
    maps = _maps(b, c, h, w, 50)
    maps = maps / torch.sqrt(torch.sum(torch.abs(maps) ** 2, dim=1, keepdim=True))
    mask = _mask_1d(h, w, 51) if mask_kind == "1d" else _mask_2d(h, w, 52)
    x, y = _rand((b, 1, h, w), 53), _rand((b, c, h, w), 54)
    ref = Sense(maps, mask)
    gpu = Sense(maps.to("cuda", torch.complex64), mask.float().cuda())
    assert gpu.fused
    for got, want in [
        (gpu.A(x.to("cuda", torch.complex64)), ref.A(x)),
        (gpu.A_adjoint(y.to("cuda", torch.complex64)), ref.A_adjoint(y)),
        (gpu.normal(x.to("cuda", torch.complex64)), ref.normal(x)),
    ]:
        err = torch.linalg.vector_norm(got.cpu().to(DT) - want) / torch.linalg.vector_norm(want)
        assert err < 1e-5, float(err)
