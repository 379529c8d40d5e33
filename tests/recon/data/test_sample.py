"""Sample: validation in __post_init__, normalisation and denormalisation, mask inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.data import Sample, infer_mask, normalization_scale, sample_from_kspace
from recon.errors import InputError


def _kspace(seed: int = 0, coils: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(coils, size, size, dtype=torch.complex64, generator=g)


def test_sample_from_kspace_normalises_and_denormalises():
    raw = _kspace() * 1e9
    mask = torch.zeros(32, 32)
    mask[:, ::2] = 1
    mask[:, 12:20] = 1
    target = torch.rand(32, 32, generator=torch.Generator().manual_seed(1)) * 1e9
    sample = sample_from_kspace(raw, fname="x.h5", mask=mask, target=target, max_value=2e9, noise_sigma=1e7)
    scale = normalization_scale(raw * mask, mask)
    assert sample.scale == pytest.approx(scale)
    torch.testing.assert_close(sample.kspace, raw * mask / scale)
    torch.testing.assert_close(sample.denormalize(sample.target), target, rtol=1e-6, atol=0)
    assert sample.max_value == pytest.approx(2e9 / scale)
    assert sample.noise_sigma == pytest.approx(1e7 / scale)
    assert sample.acceleration == pytest.approx(32 * 32 / mask.sum().item())
    assert isinstance(sample.denormalize(np.ones(2)), np.ndarray)


def test_mask_is_inferred_from_zero_entries():
    raw = _kspace()
    mask = (torch.rand(32, 32, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    mask[14:18, 14:18] = 1
    raw = raw * mask
    raw[1:, 0, 0] = 0  # a location where only coil 0 is non-zero is still measured
    torch.testing.assert_close(infer_mask(raw), mask)
    torch.testing.assert_close(sample_from_kspace(raw, fname="p.h5").mask, mask)


def _valid(**changes):
    fields = dict(
        kspace=_kspace(), mask=torch.ones(32, 32), target=torch.ones(32, 32), sens_maps=_kspace(1),
        fname="v.h5", slice_idx=3, acquisition="AXT1", max_value=1.0, noise_sigma=0.1, scale=2.0,
    )
    fields.update(changes)
    return Sample(**fields)


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(kspace=torch.ones(3, 32, 32)), "kspace"),
        (dict(kspace=_kspace()[0]), "kspace"),
        (dict(kspace=torch.full((3, 32, 32), complex(float("nan"), 0), dtype=torch.complex64)), "kspace"),
        (dict(mask=torch.ones(32, 31)), "mask"),
        (dict(mask=torch.zeros(32, 32)), "mask"),
        (dict(mask=torch.full((32, 32), 0.5)), "mask"),
        (dict(target=torch.full((32, 32), float("inf"))), "target"),
        (dict(sens_maps=_kspace(coils=2)), "sens_maps"),
        (dict(scale=0.0), "scale"),
        (dict(noise_sigma=float("nan")), "noise_sigma"),
    ],
)
def test_sample_validation_names_file_and_key(changes, key):
    _valid()  # the unchanged fields are valid
    with pytest.raises(InputError) as err:
        _valid(**changes)
    assert "v.h5" in str(err.value) and f"'{key}'" in str(err.value)


def test_sample_from_kspace_rejects_bad_input():
    with pytest.raises(InputError, match=r"a\.h5 \(slice 0\): key 'kspace'.*rank"):
        sample_from_kspace(_kspace()[None], fname="a.h5")
    with pytest.raises(InputError, match=r"a\.h5 \(slice 0\): key 'mask'"):
        sample_from_kspace(_kspace(), fname="a.h5", mask=torch.ones(33))
    with pytest.raises(InputError, match=r"a\.h5 \(slice 0\): key 'sens_maps'"):
        sample_from_kspace(_kspace(), fname="a.h5", sens_maps=_kspace(coils=4))
    with pytest.raises(InputError, match=r"a\.h5 \(slice 0\): key 'kspace'.*all zero"):
        sample_from_kspace(torch.zeros(2, 8, 8, dtype=torch.complex64), fname="a.h5")
