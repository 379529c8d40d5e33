"""Coil sensitivities: ESPIRiT on birdcage ground truth, ACS-only use, batching, the rectangular calibration
(parity with sigpy on a square, closer to the truth on a 1-D mask's centre); RSS against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from recon.coils import _espirit, acs_rectangle, acs_width, espirit_maps, rss, sensitivity_maps
from recon.errors import InputError
from recon.fft import fft2c
from recon.masks import center_box

NUM_COILS, SIZE = 8, 64


@pytest.fixture(scope="module")
def phantom():
    """Birdcage maps, a Shepp-Logan object, coil images and fully sampled k-space (complex64)."""
    true_maps = torch.from_numpy(sigpy.mri.birdcage_maps((NUM_COILS, SIZE, SIZE), r=1.5).astype(np.complex64))
    image = torch.from_numpy(sigpy.shepp_logan((SIZE, SIZE)).astype(np.complex64))
    coil_images = true_maps * image
    kspace = fft2c(coil_images)
    inside = image.abs() > 0.1 * image.abs().max()
    return true_maps, image, coil_images, kspace, inside


@pytest.fixture(scope="module")
def estimated(phantom):
    return espirit_maps(phantom[3])


def test_espirit_maps_reproduce_coil_images(phantom, estimated):
    true_maps, _, coil_images, _, inside = phantom
    assert estimated.shape == (NUM_COILS, SIZE, SIZE) and estimated.dtype == torch.complex64

    combined = (estimated.conj() * coil_images).sum(0)  # SENSE combination
    relative_error = torch.linalg.vector_norm(estimated * combined - coil_images) / torch.linalg.vector_norm(
        coil_images
    )
    assert relative_error < 0.02

    # unit norm over coils inside the object
    norm = torch.linalg.vector_norm(estimated, dim=0)
    assert torch.allclose(norm[inside], torch.ones(()), atol=1e-3)

    # the maps are the true (normalized) maps up to one phase per pixel
    normalized_truth = true_maps / torch.linalg.vector_norm(true_maps, dim=0)
    alignment = (estimated * normalized_truth.conj()).sum(0).abs()
    assert alignment[inside].min() > 0.99


def test_espirit_uses_only_the_calibration_centre(phantom, estimated):
    kspace = phantom[3]
    columns = torch.zeros(SIZE)
    columns[::4] = 1
    mask = torch.maximum(columns.expand(SIZE, SIZE), center_box((SIZE, SIZE), 26 / SIZE))
    undersampled = espirit_maps(kspace * mask, calib_width=24)
    assert torch.allclose(undersampled, estimated, atol=1e-5)
    # whereas a calibration block larger than the ACS region changes the result
    assert not torch.allclose(espirit_maps(kspace * mask, calib_width=40), estimated, atol=1e-2)


def test_espirit_batches_items_independently(phantom, estimated):
    kspace = phantom[3]
    batch = torch.stack([kspace, 2 * kspace.flip(-1)])
    maps = espirit_maps(batch)
    assert maps.shape == batch.shape and maps.dtype == torch.complex64
    assert torch.allclose(maps[0], estimated, atol=1e-5)
    assert torch.allclose(maps[1], espirit_maps(2 * kspace.flip(-1)), atol=1e-5)


def test_espirit_rejects_bad_input(phantom):
    kspace = phantom[3]
    with pytest.raises(InputError, match="must be complex"):
        espirit_maps(torch.view_as_real(kspace))  # (C, H, W, 2) real: rank 4 but real
    with pytest.raises(InputError, match=r"\(C, H, W\) or \(B, C, H, W\)"):
        espirit_maps(kspace[0])
    with pytest.raises(InputError, match="calib_width"):
        espirit_maps(kspace, calib_width=SIZE + 1)


def test_rectangular_espirit_on_a_square_is_sigpys_espirit(phantom):
    # the torch implementation (any rectangle) and sigpy's EspiritCalib (squares only) on the same square block,
    # on a non-square grid (the kernels' zero-padding and the crop's placement per axis)
    kspace = fft2c(phantom[2][:, :, 4:-4])
    for width in (12, 24):
        expected = espirit_maps(kspace, calib_width=width, crop=0.1)
        assert torch.allclose(_espirit(kspace, (width, width), 0.02, 0.1, 100), expected, atol=1e-4)


def test_rectangular_calibration_recovers_the_maps_better_from_a_narrow_centre(phantom):
    # a 1-D mask with 8 centre columns: sigpy's block is the 8 x 8 square; the rectangle takes every row
    true_maps, _, coil_images, kspace, inside = phantom
    columns = torch.zeros(SIZE)
    columns[1::4] = 1
    columns[SIZE // 2 - 4:SIZE // 2 + 4] = 1
    mask = columns.expand(SIZE, SIZE)
    assert acs_rectangle(mask) == (SIZE, 8)
    normalized_truth = true_maps / torch.linalg.vector_norm(true_maps, dim=0)

    def misalignment(maps):  # 1 - |<S_est, S_true>| per pixel: 0 for the true maps up to a phase
        return float((1 - (maps * normalized_truth.conj()).sum(0).abs())[inside].mean())

    square = espirit_maps(kspace * mask, calib_width=8, crop=0.1)
    rectangle = espirit_maps(kspace * mask, calib_width=(SIZE, 8), crop=0.1)
    assert rectangle.shape == kspace.shape and rectangle.dtype == torch.complex64
    assert misalignment(rectangle) < 0.25 * misalignment(square)
    # only the centre is read: the rest of k-space does not change the maps
    assert torch.allclose(espirit_maps(kspace * _centre(mask), calib_width=(SIZE, 8), crop=0.1), rectangle, atol=1e-5)


def _centre(mask: torch.Tensor) -> torch.Tensor:
    rows, columns = acs_rectangle(mask)
    out = torch.zeros_like(mask)
    out[:, mask.shape[1] // 2 - columns // 2:mask.shape[1] // 2 - columns // 2 + columns] = 1
    return out


def test_acs_rectangle_of_1d_and_2d_masks():
    columns = torch.zeros(40)
    columns[16:24] = 1  # 8 centre columns from 40 // 2 - 4, where the crop places them
    assert acs_rectangle(columns.expand(30, 40)) == (30, 8)
    assert acs_rectangle(columns.expand(30, 40), max_columns=6) == (30, 6)
    square = center_box((30, 40), 10 / 40)
    rows, cols = acs_rectangle(square)
    assert rows == cols and (rows, cols) == (acs_width(square),) * 2
    assert acs_rectangle(torch.zeros(30, 40)) == (0, 0)


def test_sensitivity_maps_rejects_an_unknown_calibration(phantom):
    class Slice:
        kspace, mask, sens_maps, fname, slice_idx = phantom[3], torch.ones(SIZE, SIZE), None, "f.h5", 0

    with pytest.raises(InputError, match=r"'maps_block'\) is 'diamond', expected one of square, rectangle"):
        sensitivity_maps(Slice(), block="diamond")


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_rss_matches_numpy(dim):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.complex64, generator=generator)
    expected = np.sqrt(np.sum(np.abs(x.numpy()) ** 2, axis=dim))
    result = rss(x, dim=dim)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)
    real = x.real.double()
    np.testing.assert_allclose(rss(real, dim=dim).numpy(), np.sqrt(np.sum(real.numpy() ** 2, axis=dim)), rtol=1e-12)
    assert rss(x, dim=dim, keepdim=True).shape == tuple(1 if i == dim % 4 else s for i, s in enumerate(x.shape))


def test_rss_of_a_raw_scale_image_does_not_overflow():
    # a scanner's raw scale: finite float32 coil images whose squares are not
    x = torch.full((8, 4, 4), 3e22 + 4e22j, dtype=torch.complex64)
    result = rss(x, dim=0)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), np.full((4, 4), 5e22 * np.sqrt(8)), rtol=1e-6)
