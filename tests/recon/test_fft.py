"""Centred FFT parity with fastMRI and numpy, both code paths (checkerboard and shift)."""

import fastmri
import numpy as np
import pytest
import torch

from recon.fft import checkerboard, checkerboard_sign, fft2c, fft2c_shifted, ifft2c, ifft2c_shifted

SIZES = [(8, 6), (7, 5), (8, 5), (9, 12), (64, 48), (33, 31)]


def _numpy_fft2c(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    f = np.fft.ifft2 if inverse else np.fft.fft2
    return np.fft.fftshift(f(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho", axes=(-2, -1)), axes=(-2, -1))


def _random(shape, dtype=torch.complex64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=dtype, generator=g)


@pytest.mark.parametrize("h,w", SIZES)
def test_fft2c_equals_fastmri(h, w):
    x = _random((2, 3, h, w))
    ref = torch.view_as_complex(fastmri.fft2c(torch.view_as_real(x)))
    ref_inv = torch.view_as_complex(fastmri.ifft2c(torch.view_as_real(x)))
    torch.testing.assert_close(fft2c(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ifft2c(x), ref_inv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,w", SIZES)
def test_fft2c_equals_numpy_in_float64(h, w):
    x = _random((2, h, w), torch.complex128, seed=1)
    np.testing.assert_allclose(fft2c(x).numpy(), _numpy_fft2c(x.numpy()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ifft2c(x).numpy(), _numpy_fft2c(x.numpy(), inverse=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w", [(8, 6), (10, 12), (4, 8), (6, 10)])
def test_checkerboard_identity_matches_shift_path(h, w):
    """For even sizes fft2c uses s·C⊙FFT(C⊙x); it must equal the shift formulation, both signs of s."""
    x = _random((3, h, w), torch.complex128, seed=2)
    c = checkerboard(h, w, torch.float64)
    manual = checkerboard_sign(h, w) * c * torch.fft.fft2(c * x, norm="ortho")
    torch.testing.assert_close(manual, fft2c_shifted(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(fft2c(x), fft2c_shifted(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ifft2c(x), ifft2c_shifted(x), rtol=0, atol=1e-12)
    assert {checkerboard_sign(4, 8), checkerboard_sign(6, 8)} == {1, -1}


@pytest.mark.parametrize("h,w", SIZES)
def test_roundtrip_and_unitarity(h, w):
    x = _random((2, h, w), torch.complex128, seed=3)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.vector_norm(fft2c(x)), torch.linalg.vector_norm(x), rtol=1e-12, atol=0)


def test_fft2c_keeps_autograd():
    x = _random((1, 1, 8, 6), torch.complex128, seed=4).requires_grad_(True)
    v = _random((1, 1, 8, 6), torch.complex128, seed=5)
    # ∇_x Re⟨v, F x⟩ = Fᴴ v for the unitary F
    torch.real(torch.sum(v.conj() * fft2c(x))).backward()
    torch.testing.assert_close(x.grad, ifft2c(v), rtol=0, atol=1e-12)


def test_fft2c_rejects_real_input():
    with pytest.raises(TypeError, match="complex"):
        fft2c(torch.zeros(4, 4))
