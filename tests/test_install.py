"""A regular (non-editable) install works without the checkout: the wheel carries the configs and the
bundled prior as package data, and scripts/adapt.py runs against it.

The wheel is built offline (no build isolation) and installed into a fresh virtual environment whose
only other packages are this environment's dependencies (a ``.pth`` line, which does not run this
environment's editable-install hook); the script then imports ``recon`` and ``scores`` from the wheel.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# small enough for the test suite; the same command as `--site source_brain --max-slices 1` otherwise
FAST = ["site.acquisition.matrix=[48,48]", "site.data.num_subjects=1", "site.data.slices_per_subject=1",
        "site.coils.count=4", "biasrecon.num_steps=2", "biasrecon.lam_grid=[0.01,0.1]"]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_adapt(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "out", "runs", "build", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", "notebooks", "docs"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(tmp_path / "dist"), str(source)], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("biasrecon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("recon/configs/sites/source_brain.yaml", "recon/configs/biasrecon/default.yaml",
                   "scores/weights/source_brain.safetensors", "scores/weights/colin27_t1.safetensors",
                   "recon/data/colin27_t1_slices.npy", "recon/data/COLIN27_NOTICE.txt", "recon/runner.py",
                   "scores/priors.py"):
        assert member in names, member

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    target = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       tmp_path).stdout.strip())
    (target / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                      str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    where = _run([str(python), "-c", "import recon, scores, recon.configs; print(recon.__file__, scores.__file__)"],
                 tmp_path)
    assert where.returncode == 0 and all(p.startswith(str(target)) for p in where.stdout.split()), where

    out = tmp_path / "out"
    # the demo site: its anatomy is package data (package:recon.data/...), read from the installed wheel
    done = _run([str(python), str(ROOT / "scripts" / "adapt.py"), "--site", "unseen_center", "--max-slices", "1",
                 "--out", str(out), *FAST, "site.acquisition.matrix=[128,128]"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == ["biasrecon", "unadapted"] and metrics["unadapted"]["psnr"] > 15
    assert (out / "profile.json").is_file() and list((out / "reconstructions" / "biasrecon").glob("*.h5"))
    bad = _run([str(python), str(ROOT / "scripts" / "adapt.py"), "--site", "source_brain", "--prior", "nope",
                "--out", str(tmp_path / "bad")], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "'--prior' is 'nope'" in bad.stderr and "source_brain" in bad.stderr
