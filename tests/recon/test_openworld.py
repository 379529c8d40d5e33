"""The open-world matrix's bookkeeping: exclusive claims, headroom / closure / oracle λ from records, the
config's checks, and scripts/open_world.py end to end on a tiny matrix (resume, refusals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from recon.errors import InputError
from recon.openworld import Unit, aggregate, claim, load_matrix, release, units

ROOT = Path(__file__).resolve().parents[2]
TINY = ["acquisition.matrix=[34,34]", "data.num_subjects=1", "data.slices_per_subject=2", "coils.count=6",
        "acquisition.center_fraction=0.25"]


def _config(tmp_path: Path, **changes) -> Path:
    """A two-prior, two-domain matrix on tiny simulated slices (34², 6 coils): 'brain' is the bundled brain
    prior's own domain, 'other' (labelled knee) the knee prior's, so both off-diagonal cells are cross-anatomy."""
    cfg = {
        "priors": {"brain": "source_brain", "knee": "stanford_knee"},
        "domains": {"brain": {"site": "source_brain", "overrides": TINY, "anatomy": "brain", "own_prior": "brain"},
                    "other": {"site": "unseen_center_template", "overrides": TINY + ["acquisition.mask_type=random_1d"],
                              "anatomy": "knee", "own_prior": "knee"}},
        "slices": 2, "adaptation_slices": 1, "oracle_grid": [0.001, 0.01, 0.1],
        "methods": {"classical": ["zero_filled", "tv"], "every_cell": ["unadapted_sure", "biasrecon"],
                    "cross_anatomy": ["learned_lam"]},
        "settings": {"num_steps": 2, "lam_grid": [0.03, 0.3], "sure_refine": False},
        "cells": [{"prior": "brain", "domain": "brain"}, {"prior": "knee", "domain": "brain"}],
    }
    cfg.update(changes)
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_units_follow_the_cells_and_cross_anatomy_cells_get_the_adaptation_methods(tmp_path):
    spec = load_matrix(_config(tmp_path))
    diag, cross = spec.cells
    assert diag.methods == ("unadapted_sure", "biasrecon") and cross.methods == ("unadapted_sure", "biasrecon", "learned_lam")
    work = units(spec)
    classical = [u for u in work if u.cell is None]  # once per domain and acceleration, every λ of tv
    assert len(classical) == 2 * (1 + 3) and {u.lam for u in classical if u.method == "tv"} == {0.001, 0.01, 0.1}
    assert [u.method for u in work if u.cell == cross] == ["unadapted_sure"] * 2 + ["biasrecon"] * 2 + ["learned_lam"]
    assert len({u.record_path(tmp_path) for u in work}) == len(work)
    with pytest.raises(InputError, match="'methods' names 'fancy'"):
        load_matrix(_config(tmp_path, methods={"classical": [], "every_cell": ["fancy"], "cross_anatomy": []}))
    with pytest.raises(InputError, match=r"cells\[0\]"):
        load_matrix(_config(tmp_path, cells=[{"prior": "heart", "domain": "brain"}]))
    with pytest.raises(InputError, match="cannot be read"):
        load_matrix(tmp_path / "missing.yaml")
    assert spec.maps_block == "rectangle" and load_matrix(_config(tmp_path, maps_block="square")).maps_block == "square"
    with pytest.raises(InputError, match="key 'maps_block' is 'circle', expected one of square, rectangle"):
        load_matrix(_config(tmp_path, maps_block="circle"))


def test_a_claim_is_exclusive_until_released_and_a_dead_owners_claim_is_taken_over(tmp_path):
    record = tmp_path / "records" / "cell" / "method" / "000.json"
    assert claim(record) and not claim(record)  # this process holds it
    release(record)
    assert claim(record)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record.with_suffix(".claim").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert claim(record)  # the owner is gone
    other_host = tmp_path / "records" / "x" / "000.json"
    other_host.parent.mkdir(parents=True)
    other_host.with_suffix(".claim").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    assert not claim(other_host)  # another machine's claim is trusted


def _write(out: Path, unit: Unit, **values) -> None:
    path = unit.record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": 1.0, "num_adapted": 0, **values}))


def test_headroom_closure_and_the_oracle_lambda_come_from_the_records(tmp_path):
    spec = load_matrix(_config(tmp_path))
    diag, cross = spec.cells
    psnr = {(diag, "unadapted"): [30.0, 32.0], (diag, "unadapted_sure"): [30.5, 32.5],
            (diag, "biasrecon"): [30.0, 32.2], (diag, "biasrecon_nosure"): [30.0, 32.0],
            (cross, "unadapted"): [27.0, 28.0], (cross, "unadapted_sure"): [27.0, 28.0],
            (cross, "biasrecon"): [28.0, 30.0], (cross, "biasrecon_nosure"): [28.0, 29.0],
            (cross, "learned_lam"): [29.0]}
    for (cell, method), values in psnr.items():
        for s, v in enumerate(values):
            _write(tmp_path, Unit(cell.domain, 4, method, s, cell=cell), psnr_reference=v, ssim_reference=0.9)
    tv = {0.001: [31.0, 31.0], 0.01: [33.0, 32.0], 0.1: [30.0, 36.0]}  # means 31, 32.5, 33: the edge wins
    for lam, values in tv.items():
        for s, v in enumerate(values):
            _write(tmp_path, Unit("brain", 4, "tv", s, lam=lam), psnr_reference=v, ssim_reference=0.8)
    agg = aggregate(spec, tmp_path)["cells"]
    headroom = np.mean([30.0, 32.0]) - np.mean([27.0, 28.0])
    assert agg[cross.key]["headroom"] == pytest.approx(headroom) and agg[diag.key]["headroom"] == pytest.approx(0.0)
    rows = agg[cross.key]["rows"]
    assert rows["biasrecon"]["gain"] == pytest.approx(1.5) and rows["biasrecon"]["closure"] == pytest.approx(1.5 / headroom)
    assert rows["learned_lam"]["gain"] == pytest.approx(2.0)  # on its one slice, against that slice's unadapted
    assert rows["biasrecon"]["psnr_reference"] == pytest.approx((29.0, 1.0))
    tv_row = agg[cross.key]["classical"]["tv"]
    assert tv_row["oracle_lam"] == 0.1 and tv_row["edge"] and tv_row["psnr_reference"][0] == pytest.approx(33.0)
    assert "zero_filled" not in agg[cross.key]["classical"]  # not finished: left out, never guessed


def test_the_script_runs_resumes_and_refuses_another_matrix_in_the_same_folder(tmp_path, single_thread):
    config, out = _config(tmp_path), tmp_path / "out"
    script = [sys.executable, str(ROOT / "scripts" / "open_world.py"), "--config", str(config), "--out", str(out)]
    first = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    records = sorted(out.glob("records/**/*.json"))
    assert len(records) == len(units(load_matrix(config))) + 2 * 2 * 2  # + two no-SURE twins × two slices × two cells
    stamps = {p: p.stat().st_mtime_ns for p in records}
    report = (out / "open_world.md").read_text()
    assert "learned λ" in report and "…" not in report.split("### Cost")[0]  # every expected number is there
    assert (out / "figures" / "closure_heatmap.png").exists() and (out / "figures" / f"knee__brain__4x.png").exists()
    again = subprocess.run(script, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in records} == stamps  # nothing redone
    changed = subprocess.run(script + ["settings.num_steps=3"], capture_output=True, text=True, cwd=ROOT)
    assert changed.returncode == 2 and "another matrix" in changed.stderr and changed.stderr.count("\n") == 1
    missing = _config(tmp_path, priors={"brain": "source_brain", "knee": str(tmp_path / "knee.safetensors")})
    gone = subprocess.run(script[:3] + [str(missing), "--out", str(tmp_path / "o2")], capture_output=True, text=True,
                          cwd=ROOT)
    assert gone.returncode == 2 and "key 'priors.knee'" in gone.stderr and not (tmp_path / "o2").exists()
