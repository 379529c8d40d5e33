"""NIfTI magnitude reader: values, 4-D volume selection, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from recon.data import read_nifti_magnitude
from recon.data.anatomy import epi_example_path
from recon.errors import InputError


def _save(path, data, zooms=(1.5, 2.0, 3.0)):
    affine = np.diag(list(zooms) + [1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_reads_values_volume_and_voxel_size(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 5, size=(6, 5, 4, 3)).astype(np.float32)
    path = _save(tmp_path / "v.nii.gz", data)
    vol = read_nifti_magnitude(path, volume=2)
    np.testing.assert_array_equal(vol.data, np.abs(data[..., 2]))
    assert vol.voxel_mm == (1.5, 2.0, 3.0)


def test_reads_nibabels_bundled_epi():
    vol = read_nifti_magnitude(epi_example_path())
    expected = np.asarray(nib.load(str(epi_example_path())).dataobj)[..., 0]
    np.testing.assert_array_equal(vol.data, expected.astype(np.float32))
    assert vol.data.shape == (128, 96, 24)


def test_errors_name_file_and_key(tmp_path):
    with pytest.raises(InputError, match=r"absent\.nii: file not found"):
        read_nifti_magnitude(tmp_path / "absent.nii")
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"nan\.nii: key 'data'.*NaN"):
        read_nifti_magnitude(_save(tmp_path / "nan.nii", data))
    with pytest.raises(InputError, match=r"c\.nii: key 'data' is complex"):
        read_nifti_magnitude(_save(tmp_path / "c.nii", np.ones((4, 4, 4), np.complex64)))
    with pytest.raises(InputError, match=r"t\.nii: key 'volume'"):
        read_nifti_magnitude(_save(tmp_path / "t.nii", np.ones((4, 4, 4, 2), np.float32)), volume=2)
    with pytest.raises(InputError, match=r"z\.nii: key 'data' is all zero"):
        read_nifti_magnitude(_save(tmp_path / "z.nii", np.zeros((4, 4, 4), np.float32)))
