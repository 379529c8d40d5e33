"""Metrics: parity with fastmri.evaluate for torch/numpy, 2-D/3-D, complex inputs; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastmri import evaluate as reference

from recon.errors import InputError
from recon.metrics import evaluate, nmse, psnr, ssim


def _volumes(seed: int, shape=(4, 40, 36)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.random(shape).astype(np.float32)
    pred = (target + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return target, pred


def _expected(target: np.ndarray, pred: np.ndarray, maxval=None) -> dict[str, float]:
    volume_t, volume_p = (target[None], pred[None]) if target.ndim == 2 else (target, pred)
    return {
        "psnr": float(reference.psnr(volume_t, volume_p, maxval)),
        "ssim": float(reference.ssim(volume_t, volume_p, maxval)[0]),
        "nmse": float(reference.nmse(volume_t, volume_p)),
    }


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("two_d", [False, True])
def test_metrics_equal_fastmri(as_torch, two_d):
    target, pred = _volumes(seed=1)
    if two_d:
        target, pred = target[0], pred[0]
    expected = _expected(target, pred)
    convert = torch.from_numpy if as_torch else (lambda a: a)
    t, p = convert(target), convert(pred)

    assert evaluate(t, p) == pytest.approx(expected, rel=1e-9)
    assert nmse(t, p) == pytest.approx(expected["nmse"], rel=1e-9)
    assert psnr(t, p) == pytest.approx(expected["psnr"], rel=1e-9)
    assert ssim(t, p) == pytest.approx(expected["ssim"], rel=1e-9)
    # an explicit maxval is used as fastMRI uses it
    maxval = 2.5
    assert psnr(t, p, maxval=maxval) == pytest.approx(_expected(target, pred, maxval)["psnr"], rel=1e-9)
    assert ssim(t, p, maxval=maxval) == pytest.approx(_expected(target, pred, maxval)["ssim"], rel=1e-9)


def test_volume_wise_not_slice_averaged():
    target, pred = _volumes(seed=2)
    pred[0] = target[0] + 0.5  # one bad slice
    per_slice_psnr = np.mean([reference.psnr(target[i], pred[i], target.max()) for i in range(len(target))])
    assert psnr(target, pred) == pytest.approx(float(reference.psnr(target, pred)), rel=1e-9)
    assert abs(psnr(target, pred) - per_slice_psnr) > 1.0


def test_complex_inputs_use_magnitude_and_image_shape_is_accepted():
    rng = np.random.default_rng(3)
    phase_t, phase_p = np.exp(2j * np.pi * rng.random((2, 2, 32, 32)))
    target, pred = _volumes(seed=3, shape=(2, 32, 32))
    complex_target = torch.from_numpy((target * phase_t).astype(np.complex64))
    complex_pred = torch.from_numpy((pred * phase_p).astype(np.complex64))
    magnitude = _expected(np.abs(complex_target.numpy()), np.abs(complex_pred.numpy()))
    assert evaluate(complex_target, complex_pred) == pytest.approx(magnitude, rel=1e-9)
    # the phase is ignored: magnitudes equal up to float32 rounding of |t e^{i phi}|
    assert evaluate(complex_target, complex_pred) == pytest.approx(_expected(np.abs(target), np.abs(pred)), rel=1e-5)
    # the project's image shape (slices, 1, H, W)
    assert evaluate(complex_target[:, None], complex_pred[:, None]) == pytest.approx(magnitude, rel=1e-12)


def test_perfect_reconstruction():
    target, _ = _volumes(seed=4)
    assert nmse(target, target) == 0.0
    assert ssim(target, target) == pytest.approx(1.0)
    assert psnr(target, target) == float("inf")


def test_errors():
    target, pred = _volumes(seed=5)
    with pytest.raises(InputError, match=r"pred of shape \(4, 40, 35\) must have the shape of target, \(4, 40, 36\)"):
        evaluate(target, pred[..., :-1])
    with pytest.raises(InputError, match="shape"):
        psnr(torch.from_numpy(target), torch.from_numpy(pred[:3]))
    with pytest.raises(InputError, match=r"must have shape \(slices, H, W\)"):
        nmse(target[None, None], pred[None, None])
    with pytest.raises(InputError, match="all zeros"):
        nmse(np.zeros_like(target), pred)
    with pytest.raises(InputError, match="maxval"):
        psnr(np.zeros_like(target), pred)
    with pytest.raises(InputError, match="at least 7"):
        ssim(target[:, :5, :5], pred[:, :5, :5])
    with pytest.raises(InputError, match="torch tensor or numpy array"):
        ssim(target.tolist(), pred)


def test_ssim_refuses_a_finite_target_whose_squares_overflow():
    """Raw scanner scales (1e13, whose fourth powers overflow float32) give the SSIM of the rescaled images;
    a finite target so large that float64 overflows too would give a NaN SSIM: one clear error instead."""
    import numpy as np
    import pytest

    from recon.errors import InputError
    from recon.metrics import evaluate, ssim

    rng = np.random.default_rng(0)
    target = rng.random((1, 16, 16)).astype(np.float32)
    pred = target + 0.05 * rng.random((1, 16, 16)).astype(np.float32)
    base = ssim(target, pred)
    assert base < 0.999
    for scale in (1e8, 1e13, 1e20, 3e37):  # fastMRI's float32 SSIM is NaN from about 1e10 on
        assert ssim(target * scale, pred * scale) == pytest.approx(base, rel=1e-5)  # scale-invariant
    huge = target.astype(np.float64) * 1e100
    with pytest.raises(InputError, match="target holds a magnitude"):
        ssim(huge, huge)
    with pytest.raises(InputError, match="target"):
        evaluate(huge, target.astype(np.float64))


def test_psnr_and_nmse_are_scale_invariant_at_raw_scanner_scales():
    """float32 volumes at a raw scale whose squares overflow float32 (1e20, 3e37) keep the PSNR and NMSE of the
    rescaled images (fastMRI's float32 formulas give -inf / nan there)."""
    import numpy as np
    import pytest

    from recon.metrics import nmse, psnr

    rng = np.random.default_rng(1)
    target = rng.random((2, 16, 16)).astype(np.float32)
    pred = target + 0.05 * rng.random((2, 16, 16)).astype(np.float32)
    base_psnr, base_nmse = psnr(target, pred), nmse(target, pred)
    for scale in (1e8, 1e13, 1e20, 3e37):
        scaled_target, scaled_pred = target * np.float32(scale), pred * np.float32(scale)
        assert np.isfinite(scaled_target).all() and np.isfinite(scaled_pred).all()
        assert psnr(scaled_target, scaled_pred) == pytest.approx(base_psnr, rel=1e-5)
        assert nmse(scaled_target, scaled_pred) == pytest.approx(base_nmse, rel=1e-4)
