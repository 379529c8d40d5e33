"""normalization_scale: parity with a numpy transcription, independence of the acceleration."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from recon.data import normalization_scale
from recon.errors import InputError
from recon.masks import make_mask


def _numpy_scale(kspace: np.ndarray, fraction: float) -> float:
    _, height, width = kspace.shape
    box = np.zeros((height, width))
    nh, nw = round(height * fraction), round(width * fraction)
    ph, pw = (height - nh + 1) // 2, (width - nw + 1) // 2
    box[ph:ph + nh, pw:pw + nw] = 1
    image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace * box, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return float(np.percentile(np.sqrt((np.abs(image) ** 2).sum(0)), 99))


@pytest.fixture(scope="module")
def kspace(sim_file) -> torch.Tensor:
    with h5py.File(sim_file, "r") as hf:
        return torch.from_numpy(hf["kspace"][1])


@pytest.mark.parametrize("fraction", [0.08, 0.2])
def test_scale_matches_numpy_transcription(kspace, fraction):
    assert normalization_scale(kspace, box_fraction=fraction) == pytest.approx(_numpy_scale(kspace.numpy().astype(np.complex128), fraction), rel=1e-5)


@pytest.mark.parametrize(
    "mask_type, acceleration",
    [("equispaced_1d", 4.0), ("random_1d", 8.0), ("gaussian_1d", 6.0), ("poisson_2d", 8.0), ("gaussian_2d", 5.0)],
)
def test_scale_does_not_depend_on_the_acceleration(kspace, mask_type, acceleration):
    full = normalization_scale(kspace)
    mask, achieved = make_mask(mask_type, tuple(kspace.shape[-2:]), acceleration, 0.08, seed=3)
    assert achieved > 3
    assert normalization_scale(kspace * mask, mask) == pytest.approx(full, rel=1e-6)


@pytest.mark.parametrize("factor", [1e13, 1e25])
def test_scale_is_linear_in_the_data(kspace, factor):
    # 1e25: the float32 k-space is finite (its peak is far below 3.4e38) but its squares are not
    scaled = kspace * factor
    assert torch.isfinite(torch.view_as_real(scaled)).all()
    assert normalization_scale(scaled) == pytest.approx(factor * normalization_scale(kspace), rel=1e-5)


def test_scale_errors_name_source_and_key():
    with pytest.raises(InputError, match=r"f\.h5: key 'kspace'.*central"):
        normalization_scale(torch.zeros(2, 16, 16, dtype=torch.complex64), source="f.h5")
    with pytest.raises(InputError, match=r"f\.h5: key 'kspace'.*complex"):
        normalization_scale(torch.zeros(2, 16, 16), source="f.h5")
