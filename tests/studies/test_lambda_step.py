"""studies/lambda_step.py: its table's gains are the per-slice differences of the records, and bad input exits 2
before anything is computed or written."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_script


def _record(fixed, noise, residual, oracle, chi2):
    return {"fixed": {"lam": 0.1, "psnr": fixed}, "sure_noise": {"lam": 0.01, "psnr": noise},
            "sure_residual": {"lam": 1.0, "psnr": residual}, "oracle": {"lam": 0.3, "psnr": oracle}, "chi2": chi2}


def test_report_gains_are_the_mean_and_worst_per_slice_differences():
    script = load_script("studies/lambda_step.py")
    records = {"a__b__4x": [_record(30.0, 29.0, 30.2, 30.5, 9.0), _record(32.0, 32.1, 31.9, 32.2, 3.0)],
               "c__d__8x": [_record(20.0, 20.0, 20.0, 20.0, None)]}
    table = script.report(records, "python studies/lambda_step.py")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    slices, chi2, fixed, noise, residual, oracle = rows["a__b__4x"]
    assert slices == "2" and chi2 == "3.0–9.0" and fixed == f"{np.mean([30.0, 32.0]):.2f}"
    assert noise == "-0.45 (-1.00)" and residual == "+0.05 (-0.10)" and oracle == "+0.35"
    assert rows["c__d__8x"][1] == "—"
    assert rows["**all**"][0] == "3" and rows["**all**"][3] == f"{np.mean([-1.0, 0.1, 0.0]):+.2f} (-1.00)"


def test_bad_cells_and_slice_counts_exit_2_naming_the_key(tmp_path, capsys):
    script = load_script("studies/lambda_step.py")
    assert script.main(["--cells", "knee_prior/source_brain/4", "--out", str(tmp_path / "o")]) == 2
    assert "'--cells'" in capsys.readouterr().err
    assert script.main(["--slices", "40", "--out", str(tmp_path / "o")]) == 2
    assert "'--slices'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gate_table_sets_the_slices_above_the_limit_to_the_unadapted_prior(tmp_path):
    import json

    script = load_script("studies/lambda_step.py")
    records = tmp_path / "records"
    psnr = {"unadapted": [30.0, 31.0, 32.0], "biasrecon_nosure": [29.0, 31.5, 32.2]}
    for method, values in psnr.items():
        for s, value in enumerate(values):
            path = records / "p__d__4x" / method / f"{s:03d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"slice": s, "domain": "d", "acceleration": 4, "psnr_reference": value}))
    chi2 = {("d", 4, 0): 9.0, ("d", 4, 1): 1.5, ("d", 4, 2): 3.0}
    row = [line for line in script.gate_table(records, chi2, 2.5).splitlines() if line.startswith("| p__d__4x")][0]
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells == ["3", f"{np.mean([-1.0, 0.5, 0.2]):+.2f} (-1.00)", f"{np.mean([0.0, 0.5, 0.0]):+.2f} (+0.00)", "2"]
    del chi2[("d", 4, 2)]  # a slice without a measured χ²: the cell is left out, not guessed
    assert "p__d__4x" not in script.gate_table(records, chi2, 2.5)
