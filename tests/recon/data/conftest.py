"""Shared fixtures of the data tests: a tiny simulated site and an h5 writer for broken files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from recon.data.sites import load_site, simulate_site

TINY = ["acquisition.matrix=[64,64]", "data.num_subjects=1", "data.slices_per_subject=2", "coils.count=4"]


@pytest.fixture(scope="session")
def tiny_site():
    """source_brain at 64 x 64, 4 coils, one subject of two slices."""
    return load_site("source_brain", TINY)


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory, tiny_site) -> Path:
    """A folder written once by the simulator (fully sampled, seed 5)."""
    out = tmp_path_factory.mktemp("sim")
    simulate_site(tiny_site, out, seed=5)
    return out


@pytest.fixture(scope="session")
def sim_file(sim_dir) -> Path:
    (path,) = sorted(sim_dir.glob("*.h5"))
    return path


def _write_h5(path: Path, datasets: dict, attrs: dict | None = None) -> Path:
    """Write an h5 file with the given datasets (no validation: used to build broken inputs)."""
    with h5py.File(path, "w") as hf:
        for key, value in datasets.items():
            hf.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            hf.attrs[key] = value
    return path


def _copy_h5(src: Path, dst: Path, replace: dict | None = None, drop: tuple = (), scale: float = 1.0) -> Path:
    """Copy a fastMRI file, replacing or dropping datasets; ``scale`` multiplies raw-scale data."""
    replace = replace or {}
    with h5py.File(src, "r") as hf:
        data = {k: np.asarray(hf[k][()]) for k in hf.keys() if k not in drop}
        attrs = dict(hf.attrs)
    for key in ("kspace", "reconstruction_rss"):
        if key in data:
            data[key] = (data[key] * scale).astype(data[key].dtype)
    for key in ("max", "norm", "noise_sigma"):
        if key in attrs:
            attrs[key] = attrs[key] * scale
    data.update(replace)
    return _write_h5(dst, data, attrs)


@pytest.fixture
def write_h5():
    """The raw h5 writer (see :func:`_write_h5`)."""
    return _write_h5


@pytest.fixture
def copy_h5():
    """The fastMRI file copier (see :func:`_copy_h5`)."""
    return _copy_h5
