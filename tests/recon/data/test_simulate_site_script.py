"""scripts/simulate_site.py: the documented command, exit code 2 and nothing written on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fastmri.data
import h5py
import numpy as np
import pytest
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "simulate_site.py"
TINY = ["acquisition.matrix=[64,64]", "data.num_subjects=1", "data.slices_per_subject=2", "coils.count=4"]


def test_documented_command_writes_the_demo_site_from_the_packaged_slices(tmp_path):
    out = tmp_path / "unseen_center"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--site", "unseen_center", "--out", str(out), "--seed", "3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,  # not the checkout: package data only
    )
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.h5"))
    assert len(files) == 1
    assert str(out.resolve()) in result.stdout and all(str(f) in result.stdout for f in files)
    dataset = fastmri.data.SliceDataset(out, challenge="multicoil")
    assert len(dataset) == 4 and dataset[0][0].shape == (12, 217, 181)
    slices = np.load(REPO / "recon" / "data" / "colin27_t1_slices.npy").astype(np.float64)
    with h5py.File(files[0], "r") as hf:  # the clean reference is the packaged anatomy up to one scale per volume
        clean = hf["reconstruction_clean"][()]
    scale = np.vdot(slices.ravel(), clean.ravel()) / np.vdot(slices.ravel(), slices.ravel())
    assert np.allclose(clean, scale * slices, rtol=0, atol=1e-4 * clean.max())


def test_overwrite_and_prospective_flags(tmp_path, capsys):
    script = load_script("scripts/simulate_site.py")
    out = tmp_path / "sim"
    assert script.main(["--site", "source_brain", "--out", str(out), "--seed", "1", *TINY]) == 0
    (path,) = out.glob("*.h5")
    first = path.read_bytes()
    assert script.main(["--site", "source_brain", "--out", str(out), "--seed", "2", "--overwrite", "--prospective", *TINY]) == 0
    assert path.read_bytes() != first
    assert str(path) in capsys.readouterr().out


def _fails(args, tmp_path, capsys, *fragments):
    script = load_script("scripts/simulate_site.py")
    code = script.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_unknown_site_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["--site", "nowhere", "--out", str(out)], tmp_path, capsys, "'site'", "'nowhere'", "source_brain")
    assert not out.exists()


def test_bad_override_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["--site", "source_brain", "--out", str(out), "acquisition.acceleratio=8"], tmp_path, capsys,
           "source_brain.yaml", "'acquisition.acceleratio'")
    assert not out.exists()


def test_fastmri_site_without_root_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["--site", "fastmri_knee", "--out", str(out)], tmp_path, capsys, "fastmri_knee.yaml", "'data.root'")
    assert not out.exists()


def test_existing_file_is_not_overwritten_without_flag(tmp_path, capsys):
    script = load_script("scripts/simulate_site.py")
    out = tmp_path / "sim"
    assert script.main(["--site", "source_brain", "--out", str(out), *TINY]) == 0
    (path,) = out.glob("*.h5")
    before = path.read_bytes()
    capsys.readouterr()
    _fails(["--site", "source_brain", "--out", str(out), "--seed", "9", *TINY], tmp_path, capsys, path.name, "'out'")
    assert path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [path.name]


@pytest.mark.parametrize("override", ["acquisition.mask_type=spiral", "coils.radius=0.5", "anatomy.orientation=oblique"])
def test_invalid_values_exit_2(tmp_path, capsys, override):
    out = tmp_path / "out"
    key = override.split("=")[0]
    _fails(["--site", "source_brain", "--out", str(out), override], tmp_path, capsys, f"'{key}'")
    assert not out.exists()
