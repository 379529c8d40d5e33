"""scripts/reconstruct.py end to end on a tiny simulated site: fastMRI-format outputs scored by
fastmri.evaluate, metrics.json equal to recomputed numbers, best-λ tuning, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from fastmri import evaluate as fm_eval

from recon.coils import sensitivity_maps
from recon.methods import CLASSICAL_METHODS, run_baseline
from recon.data import FastMRISliceDataset
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "reconstruct.py"
TINY = ["acquisition.matrix=[64,64]", "data.num_subjects=2", "data.slices_per_subject=2", "coils.count=4",
        "acquisition.center_fraction=0.16"]
FAST = ["--param", "l1wavelet.max_iter=40", "--param", "tv.max_iter=40", "--param", "sense.max_iter=15"]


reconstruct = load_script("scripts/reconstruct.py")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One run of every classical method on the simulated site (simulated into OUT/data), tuned."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["--site", "source_brain", "--method", "all", "--out", str(out), "--tune", "--grid", "1e-1,1e-3,1e-5",
            *FAST, *TINY]
    assert reconstruct.main(argv) == 0
    return out


def _data_files(out: Path) -> list[Path]:
    (folder,) = (out / "data").iterdir()
    return sorted(folder.glob("*.h5"))


def test_outputs_are_fastmri_submissions_and_metrics_match_fastmri_evaluate(full_run):
    files = _data_files(full_run)
    assert len(files) == 2
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert sorted(metrics) == sorted(CLASSICAL_METHODS)
    for method in CLASSICAL_METHODS:
        scores = {"psnr": [], "ssim": [], "nmse": []}
        for path in files:
            with h5py.File(full_run / "reconstructions" / method / path.name, "r") as hf:
                assert list(hf.keys()) == ["reconstruction"]
                recon = hf["reconstruction"][()]
            with h5py.File(path, "r") as hf:
                target = hf["reconstruction_rss"][()]
            assert recon.dtype == np.float32 and recon.shape == target.shape
            scores["psnr"].append(fm_eval.psnr(target, recon))
            scores["ssim"].append(fm_eval.ssim(target, recon))
            scores["nmse"].append(fm_eval.nmse(target, recon))
        for key, values in scores.items():
            # float32 vs float64 data range inside SSIM: equal to rounding
            assert metrics[method][key] == pytest.approx(float(np.mean(values)), rel=1e-6), (method, key)
        assert metrics[method]["seconds_per_slice"] > 0
        assert metrics[method]["psnr"] > 18  # a reconstruction of the anatomy, not noise
    assert metrics["tv"]["psnr"] > metrics["zero_filled"]["psnr"] + 1.0
    assert metrics["l1wavelet"]["psnr"] > metrics["zero_filled"]["psnr"] + 1.0


def test_written_volume_is_the_denormalised_magnitude_of_the_method(full_run):
    path = _data_files(full_run)[1]
    dataset = FastMRISliceDataset(path, mask_type="equispaced_1d", acceleration=4.0, center_fraction=0.16)
    with h5py.File(full_run / "reconstructions" / "sense" / path.name, "r") as hf:
        written = hf["reconstruction"][()]
    for s in range(len(dataset)):
        sample = dataset[s]
        image = run_baseline("sense", sample, sensitivity_maps(sample), max_iter=15).image
        np.testing.assert_allclose(written[s], sample.denormalize(image.abs()).numpy(), rtol=1e-5,
                                   atol=1e-5 * float(written.max()))


def test_tuning_records_the_best_grid_point(full_run):
    tuning = json.loads((full_run / "tuning.json").read_text())
    assert sorted(tuning) == ["l1wavelet", "tv"]
    for method, entry in tuning.items():
        table = entry["grid"]
        assert [row["lam"] for row in table] == [1e-1, 1e-3, 1e-5]
        assert entry["lam"] == max(table, key=lambda row: row["mean_psnr"])["lam"]


def test_data_flag_max_slices_and_input_folder_untouched(full_run, tmp_path, capsys):
    data = _data_files(full_run)[0].parent
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    out = tmp_path / "partial"
    argv = ["--site", "source_brain", "--method", "zero_filled", "--data", str(data), "--max-slices", "3",
            "--out", str(out), *TINY]
    assert reconstruct.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before
    files = sorted((out / "reconstructions" / "zero_filled").glob("*.h5"))
    assert [p.name for p in files] == [p.name for p in _data_files(full_run)]
    shapes = []
    for path in files:
        with h5py.File(path, "r") as hf:
            shapes.append(hf["reconstruction"].shape)
    assert shapes == [(2, 64, 64), (1, 64, 64)]  # the first three slices in dataset order
    # the same zero-filled slices as the full run
    with h5py.File(full_run / "reconstructions" / "zero_filled" / files[1].name, "r") as hf:
        full = hf["reconstruction"][()]
    with h5py.File(files[1], "r") as hf:
        np.testing.assert_array_equal(hf["reconstruction"][()], full[:1])
    metrics = json.loads((out / "metrics.json").read_text())
    with h5py.File(data / files[1].name, "r") as hf:
        target = hf["reconstruction_rss"][:1]
    with h5py.File(data / files[0].name, "r") as hf:
        target0 = hf["reconstruction_rss"][()]
    with h5py.File(files[0], "r") as hf:
        recon0 = hf["reconstruction"][()]
    expected = np.mean([fm_eval.psnr(target0, recon0), fm_eval.psnr(target, full[:1])])
    assert metrics["zero_filled"]["psnr"] == pytest.approx(expected, rel=1e-6)


def _assert_bad_input(capsys, out: Path, argv: list[str], fragment: str) -> None:
    assert reconstruct.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--data", str(tmp_path / "nope"), "--out", str(out)],
                      "--data")


def test_unknown_method(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--method", "sense,fancy", "--out", str(out)], "'fancy'")


def test_corrupt_h5(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.h5").write_bytes(b"this is not an HDF5 file")
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--data", str(data), "--out", str(out)], "broken.h5")


def test_output_inside_input_folder_and_bad_params(full_run, tmp_path, capsys):
    data = _data_files(full_run)[0].parent
    inside = data / "results"
    _assert_bad_input(capsys, inside, ["--site", "source_brain", "--data", str(data), "--out", str(inside)],
                      "input data folder")
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--method", "tv", "--param", "tv.lamda=1",
                                    "--out", str(out)], "tv.lamda")
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--method", "tv", "--param", "tv.max_iter=abc",
                                    "--out", str(out)], "max_iter")
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--method", "sense", "--tune", "--out", str(out)],
                      "--tune")
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--out", str(out), "acquisition.nope=3"], "nope")
    _assert_bad_input(capsys, out, ["--site", "source_brain"], "--out")


def test_command_line_exit_code(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--site", "source_brain", "--method", "nope", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_fastmri_site_reads_the_data_flag_without_data_root(full_run, tmp_path):
    data = _data_files(full_run)[0].parent
    out = tmp_path / "knee"
    argv = ["--site", "fastmri_knee", "--method", "zero_filled", "--data", str(data), "--max-slices", "1",
            "--out", str(out), "acquisition.center_fraction=0.16"]
    assert reconstruct.main(argv) == 0
    with h5py.File(out / "reconstructions" / "zero_filled" / _data_files(full_run)[0].name, "r") as hf:
        assert hf["reconstruction"].shape == (1, 64, 64)
    assert "zero_filled" in json.loads((out / "metrics.json").read_text())


def test_prior_is_a_bundled_name_or_a_file_and_checked_first(tmp_path, capsys):
    """``--prior`` is resolved before anything else is read or written, even for classical methods."""
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "source_brain", "--method", "sense", "--prior", "nowhere",
                                    "--out", str(out)], "key '--prior' is 'nowhere'")


def test_same_output_shape_as_adapt_for_a_file_with_a_recon_size_header(full_run, tmp_path):
    """fastMRI's recon_size from the header decides the submission size, whatever the target's size."""
    from recon.data import ismrmrd_header, write_kspace_volume

    source = _data_files(full_run)[0]
    with h5py.File(source, "r") as hf:
        kspace = hf["kspace"][:1]
    data = tmp_path / "data"
    data.mkdir()
    write_kspace_volume(data / "cropped.h5", kspace, header=ismrmrd_header((64, 64), (48, 40)))
    out_r, out_a = tmp_path / "r", tmp_path / "a"
    assert reconstruct.main(["--site", "source_brain", "--method", "zero_filled", "--data", str(data),
                             "--out", str(out_r), *TINY]) == 0
    adapt = load_script("scripts/adapt.py", "adapt_for_shape")
    assert adapt.main(["--site", "source_brain", "--data", str(data), "--out", str(out_a), "methods=[zero_filled]",
                       *[f"site.{t}" for t in TINY]]) == 0
    shapes = []
    for out in (out_r, out_a):
        with h5py.File(out / "reconstructions" / "zero_filled" / "cropped.h5", "r") as hf:
            shapes.append(hf["reconstruction"].shape)
    assert shapes == [(1, 48, 40), (1, 48, 40)]
