"""studies/heldout_blind_spot.py: its ratios are the candidates' errors over γ = 0's on the held-out and on the
never-sampled columns, and bad input exits 2 before anything is computed or written."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_script


def test_summary_ratios_split_the_heldout_columns_from_the_never_sampled_ones():
    script = load_script("studies/heldout_blind_spot.py")
    kx = [3, 2, 1, 0, 1, 2, 3, 4]  # 8 columns, centre at 3
    sampled = [False, True, True, True, True, False, True, False]
    heldout = [False, True, False, False, False, False, True, False]
    zero = np.array([4.0, 1.0, 0.1, 0.1, 0.1, 2.0, 1.0, 3.0])
    gamma = zero.copy()
    gamma[[1, 6]] *= 0.5  # better where the guard looks
    gamma[[0, 5, 7]] *= 1.5  # worse where the mask never sampled
    record = {"cell": "c", "slice": 0, "fname": "f.h5", "kx": kx, "sampled": sampled, "heldout": heldout,
              "chains": {"t=1": {"column_error": gamma.tolist(), "psnr": 20.0},
                         "zero": {"column_error": zero.tolist(), "psnr": 21.0}}}
    lines = script.summary(record)
    assert "held-out |kx| [2, 3]" in lines[0]
    assert "Λv 0.500" in lines[1] and "never sampled 1.500" in lines[1]
    assert "Λv 1.000" in lines[2] and "never sampled 1.000" in lines[2]


def test_bad_slices_and_rows_exit_2_naming_the_key(tmp_path, capsys):
    script = load_script("studies/heldout_blind_spot.py")
    for argv, key in ((["--slices", "7"], "'--slices'"), (["--slices", "a"], "'--slices'"),
                      (["--row", "magic"], "'--row'")):
        assert script.main([*argv, "--out", str(tmp_path / "o"), "--screen-out", str(tmp_path / "s")]) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
