"""Whole-test-set runs: torchrun sharding equals one process, resumable per-volume records, and
SIGTERM / SIGINT leaving no partial file (scripts/adapt.py and scripts/reconstruct.py, real
subprocesses on a tiny simulated site: 3 volumes of 2 slices, 32 x 32, 4 coils)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from recon.jobs import Ranks, config_hash, read_record, write_record
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
SITE = ["site.acquisition.matrix=[32,32]", "site.data.num_subjects=3", "site.data.slices_per_subject=2",
        "site.coils.count=4", "site.acquisition.center_fraction=0.25", "site.acquisition.acceleration=3"]
ADAPT = ["--site", "unseen_center_template", "mode=site", "calib_slices=2", "batch_size=1", "biasrecon.num_steps=3",
         "biasrecon.lam_grid=[0.01,0.1]", *SITE]
RECON = ["--site", "unseen_center_template", "--method", "zero_filled,sense,unadapted", "--param", "unadapted.num_steps=3",
         *[s[len("site."):] for s in SITE]]
FILES = [f"unseen_center_template_{i:03d}.h5" for i in range(100, 103)]  # the site's subject_seed_offset is 100
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # the same arithmetic in every process


def _run(script: str, args: list[str], nproc: int = 1, **kwargs) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, str(ROOT / "scripts" / script), *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, **kwargs)


def _volumes(out: Path, method: str) -> dict[str, np.ndarray]:
    folder = out / "reconstructions" / method
    result = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as hf:
            result[path.name] = hf["reconstruction"][()]
    return result


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def adapt_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt1") / "out"
    done = _run("adapt.py", [*ADAPT, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def recon_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("recon1") / "out"
    done = _run("reconstruct.py", [*RECON, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


def test_ranks_split_volumes_round_robin_and_cover_each_once():
    owners = [[n for n in range(7) if Ranks(r, 3).owns(n)] for r in range(3)]
    assert owners == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.mark.slow
def test_adapt_on_two_torchrun_processes_equals_one_process(adapt_single, tmp_path):
    """Mode site: rank 0 calibrates γ and broadcasts it; the ranks share the volumes."""
    out = tmp_path / "out"
    done = _run("adapt.py", [*ADAPT, "--out", str(out)], nproc=2)
    assert done.returncode == 0, done.stderr
    assert "on 2 processes" in done.stdout
    for method in ("biasrecon", "unadapted"):
        single, sharded = _volumes(adapt_single, method), _volumes(out, method)
        assert sorted(sharded) == FILES
        for name in FILES:
            np.testing.assert_array_equal(sharded[name], single[name], err_msg=f"{method} {name}")
    single_metrics = json.loads((adapt_single / "metrics.json").read_text())
    sharded_metrics = json.loads((out / "metrics.json").read_text())
    for method in single_metrics:
        for key in ("psnr", "ssim", "nmse", "lam", "val_loss_zero", "val_loss_best"):
            assert sharded_metrics[method].get(key) == single_metrics[method].get(key), (method, key)
    assert json.loads((out / "profile.json").read_text())["gamma"] == \
        json.loads((adapt_single / "profile.json").read_text())["gamma"]


@pytest.mark.slow
def test_reconstruct_on_two_torchrun_processes_equals_one_process(recon_single, tmp_path):
    out = tmp_path / "out"
    done = _run("reconstruct.py", [*RECON, "--out", str(out)], nproc=2)
    assert done.returncode == 0, done.stderr
    for method in ("zero_filled", "sense", "unadapted"):
        single, sharded = _volumes(recon_single, method), _volumes(out, method)
        assert sorted(sharded) == FILES
        for name in FILES:
            np.testing.assert_array_equal(sharded[name], single[name], err_msg=f"{method} {name}")
    single_metrics = json.loads((recon_single / "metrics.json").read_text())
    sharded_metrics = json.loads((out / "metrics.json").read_text())
    for method in single_metrics:
        for key in ("psnr", "ssim", "nmse"):
            assert sharded_metrics[method][key] == single_metrics[method][key], (method, key)


def test_rerun_skips_finished_volumes_and_redoes_changed_ones(tmp_path, capsys):
    reconstruct = load_script("scripts/reconstruct.py", "reconstruct_script_jobs")
    out = tmp_path / "out"
    args = ["--site", "unseen_center_template", "--method", "zero_filled,sense", *RECON[6:], "--out", str(out)]

    def run(*extra: str) -> str:
        assert reconstruct.main([*args, *extra]) == 0
        return capsys.readouterr().out

    assert "already done" not in run()
    first = _volumes(out, "sense")
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "reconstructions").rglob("*.h5")}
    assert "6 slices were already done" in run()
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    (out / "reconstructions" / "sense" / FILES[1]).unlink()  # an output lost: that volume is redone
    assert "4 slices were already done" in run()
    np.testing.assert_array_equal(_volumes(out, "sense")[FILES[1]], first[FILES[1]])
    assert "already done" not in run("--param", "sense.lam=0.5")  # another config: every volume redone
    assert not np.array_equal(_volumes(out, "sense")[FILES[0]], first[FILES[0]])
    assert "6 slices were already done" in run("--param", "sense.lam=0.5")
    assert not _temp_files(out)


def _kill_after_first_record(script: str, args: list[str], signum: int) -> subprocess.Popen:
    """Start a run, wait until its first volume is recorded, then send ``signum``."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = Path(args[args.index("--out") + 1])
    deadline = time.monotonic() + 300
    while not list((out / "records").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("script, signum", [("adapt.py", signal.SIGTERM), ("reconstruct.py", signal.SIGINT)])
def test_killed_run_leaves_no_partial_file_and_a_rerun_completes_the_set(script, signum, adapt_single,
                                                                        recon_single, tmp_path):
    args, reference, method = ((ADAPT, adapt_single, "biasrecon") if script == "adapt.py"
                               else (RECON, recon_single, "unadapted"))
    out = tmp_path / "out"
    proc = _kill_after_first_record(script, [*args, "--out", str(out)], signum)
    stderr = proc.stderr.read()
    assert proc.returncode == 128 + signum, stderr
    assert "rerun the same command" in stderr and "Traceback" not in stderr
    assert not _temp_files(out)
    records = list((out / "records").glob("*.json"))
    assert 1 <= len(records) < 3 and not (out / "metrics.json").exists()
    for path in (out / "reconstructions").rglob("*.h5"):  # every file there is a whole, readable volume
        with h5py.File(path, "r") as hf:
            assert hf["reconstruction"].shape[0] == 2
    rerun = _run(script, [*args, "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert f"{2 * len(records)} slices were already done" in rerun.stdout
    done, expected = _volumes(out, method), _volumes(reference, method)
    assert sorted(done) == FILES
    for name in FILES:
        np.testing.assert_array_equal(done[name], expected[name], err_msg=name)


def test_record_is_read_back_only_with_the_same_hash_and_its_outputs(tmp_path):
    output = tmp_path / "a.h5"
    output.write_bytes(b"x")
    digest = config_hash({"lam": 0.01, "file": "a.h5"})
    assert digest != config_hash({"lam": 0.02, "file": "a.h5"})
    write_record(tmp_path / "a.json", {"config_hash": digest, "value": 1.5})
    assert read_record(tmp_path / "a.json", digest, [output]) == {"config_hash": digest, "value": 1.5}
    assert read_record(tmp_path / "a.json", "0" * 16, [output]) is None
    assert read_record(tmp_path / "a.json", digest, [tmp_path / "missing.h5"]) is None
    (tmp_path / "a.json").write_text("{not json")
    assert read_record(tmp_path / "a.json", digest, [output]) is None
