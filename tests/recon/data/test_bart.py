"""BART .cfl/.hdr: round trip, Fortran order and header format, k-space dimension mapping, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.data import bart_kspace_to_slices, read_cfl, slices_to_bart_kspace, write_cfl
from recon.errors import InputError


def _array(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_round_trip_of_a_file_it_wrote(tmp_path):
    a = _array((5, 4, 1, 3))
    base = write_cfl(tmp_path / "ksp", a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ksp.cfl", "ksp.hdr"]  # no temporary files
    back = read_cfl(base)
    assert back.dtype == np.complex64
    np.testing.assert_array_equal(back, a)  # interior singleton kept, trailing ones dropped
    assert back.shape == (5, 4, 1, 3)
    np.testing.assert_array_equal(read_cfl(tmp_path / "ksp.cfl"), a)


def test_layout_is_bart_format(tmp_path):
    a = _array((3, 2))
    write_cfl(tmp_path / "x", a)
    lines = (tmp_path / "x.hdr").read_text().splitlines()
    assert lines[0] == "# Dimensions"
    assert [int(d) for d in lines[1].split()] == [3, 2] + [1] * 14
    raw = np.fromfile(tmp_path / "x.cfl", dtype="<f4").reshape(-1, 2)
    flat = raw[:, 0] + 1j * raw[:, 1]
    # Fortran order: the first index varies fastest
    assert flat[1] == a[1, 0] and flat[3] == a[0, 1]
    np.testing.assert_array_equal(flat, a.ravel(order="F"))


def test_kspace_dimension_mapping_round_trips():
    project = torch.from_numpy(_array((2, 4, 6, 5)))  # (slices, coils, H, W)
    bart = slices_to_bart_kspace(project)
    assert bart.shape == (6, 5, 2, 4)
    assert bart[3, 1, 1, 2] == project[1, 2, 3, 1].item()
    torch.testing.assert_close(bart_kspace_to_slices(bart), project)
    assert bart_kspace_to_slices(_array((6, 5))).shape == (1, 1, 6, 5)


def test_errors_name_file_and_key(tmp_path):
    with pytest.raises(InputError, match=r"absent\.hdr: file not found"):
        read_cfl(tmp_path / "absent")
    write_cfl(tmp_path / "short", _array((4, 4)))
    (tmp_path / "short.cfl").write_bytes((tmp_path / "short.cfl").read_bytes()[:-8])
    with pytest.raises(InputError, match=r"short\.cfl: key 'data' holds 120 bytes, expected 128"):
        read_cfl(tmp_path / "short")
    (tmp_path / "bad.hdr").write_text("# Dims\n4 4\n")
    (tmp_path / "bad.cfl").write_bytes(b"")
    with pytest.raises(InputError, match=r"bad\.hdr: key '# Dimensions'"):
        read_cfl(tmp_path / "bad")
    with pytest.raises(InputError, match=r"key 'kspace'.*complex"):
        bart_kspace_to_slices(np.ones((4, 4), np.float32))
