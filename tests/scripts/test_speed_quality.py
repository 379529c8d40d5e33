"""scripts/speed_quality.py and recon.speed_quality: the curve's points, resuming, the knee rule, the report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from recon.speed_quality import CurvePoint, PointStore, curve_table, knee_point, pareto_front

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "speed_quality.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("speed_quality_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _point(case: str, method: str, levels: int, samples: int, seconds: float, psnr: float) -> CurvePoint:
    return CurvePoint("cpu", case, method, levels, samples, seconds, psnr, 0.9)


def test_knee_is_the_cheapest_setting_within_the_tolerance_on_every_case():
    """Cheapest by levels × samples (the seconds of a loaded machine are not comparable between points)."""
    points = [
        _point("knee", "unadapted", 8, 1, 10, 34.0), _point("head", "unadapted", 8, 1, 9, 28.0),
        _point("knee", "unadapted", 20, 1, 25, 34.8), _point("head", "unadapted", 20, 1, 22, 28.9),
        _point("knee", "unadapted", 40, 2, 100, 35.3), _point("head", "unadapted", 40, 2, 90, 29.0),
        _point("knee", "unadapted", 60, 4, 300, 35.4), _point("head", "unadapted", 60, 4, 280, 29.2),
        _point("knee", "unadapted", 20, 4, 95, 35.25), _point("head", "unadapted", 20, 4, 85, 28.9),  # head: −0.3
        _point("knee", "tv", 0, 0, 5, 34.3),
        _point("knee", "biasrecon", 8, 1, 150, 34.1),  # measured on one case only: no knee
    ]
    assert knee_point(points, "unadapted", 0.2) == (40, 2)
    assert knee_point(points, "unadapted", 0.5) == (20, 4)
    assert knee_point(points, "unadapted", 0.0) == (60, 4)
    assert knee_point(points, "biasrecon") is None and knee_point(points, "tv") is None
    front = pareto_front([p for p in points if p.case == "knee" and p.method == "unadapted"])
    assert [(p.levels, p.samples) for p in front] == [(8, 1), (20, 1), (20, 4), (40, 2), (60, 4)]
    table = curve_table(points)
    assert "| tv | — | — | — | 5.0 | 34.30 | 0.900 | — |" in table
    assert "| unadapted | 40 | 2 | 80 | 100.0 | 35.30 | 0.900 | -0.10 ✓ |" in table


TINY = ("acquisition.matrix=[32,32]", "data.num_subjects=1", "data.slices_per_subject=1", "coils.count=4",
        "acquisition.center_fraction=0.25", "acquisition.acceleration=3")


def test_sweep_resumes_and_reports(tmp_path, monkeypatch):
    """A tiny case: every point stored once, a rerun computes nothing, K samples average the first K chains,
    and the report holds the table, the knees and the figure."""
    script = _load_script()
    monkeypatch.setitem(script.CASES, "tiny", script.Case("unseen_center", 0, "source_brain", "tiny", TINY))
    runs = []
    original = script._prior_run

    def counted(prior, op, y, settings, device):
        runs.append((settings.num_steps, settings.num_samples, settings.adapt, settings.seed))
        return original(prior, op, y, settings, device)

    monkeypatch.setattr(script, "_prior_run", counted)
    out, record, figure = tmp_path / "sq", tmp_path / "speed_quality.md", tmp_path / "speed_quality.png"
    argv = ["--cases", "tiny", "--levels", "2", "--samples", "1,2", "--biasrecon-points", "2x1",
            "--oracle-grid", "0.01", "--out", str(out), "--record", str(record), "--figure", str(figure),
            "--threads", str(__import__("torch").get_num_threads())]
    assert script.main(argv) == 0
    assert sorted(runs) == [(2, 1, "gamma", 0), (2, 1, "none", 0), (2, 1, "none", 1)]  # two chains, one BiasRecon
    points = {p.key: p for p in PointStore(out).points()}
    assert set(points) == {f"cpu_tiny_{m}" for m in ("sense_L0_K0", "tv_L0_K0", "l1wavelet_L0_K0", "unadapted_L2_K1",
                                                      "unadapted_L2_K2", "biasrecon_L2_K1")}
    one, two = points["cpu_tiny_unadapted_L2_K1"], points["cpu_tiny_unadapted_L2_K2"]
    assert two.seconds > one.seconds and two.psnr != one.psnr
    runs.clear()
    assert script.main(argv) == 0 and runs == []  # resumed: nothing measured again
    record.write_text("# Notes above\n\n" + record.read_text() + "\nNotes below.\n")
    assert script.main([*argv, "--report-only"]) == 0
    text = record.read_text()
    assert text.startswith("# Notes above\n") and text.endswith("\nNotes below.\n") and text.count(script.BEGIN) == 1
    assert "cpu, unadapted: **2 levels × 1 samples**" in text or "cpu, unadapted: **2 levels × 2 samples**" in text
    assert "**tiny, cpu**" in text and figure.stat().st_size > 1000


def test_bad_arguments(capsys):
    script = _load_script()
    assert script.main(["--cases", "elbow"]) == 2
    assert "--cases" in capsys.readouterr().err
    assert script.main(["--biasrecon-points", "8by1"]) == 2
    assert "--biasrecon-points" in capsys.readouterr().err
