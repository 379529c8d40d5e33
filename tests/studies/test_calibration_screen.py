"""studies/calibration_screen.py: its table's gains are the per-slice differences of the records against the
unadapted prior's, and bad input exits 2 before anything is computed or written."""

from __future__ import annotations

import json

from tests.conftest import load_script


def _write(script, out, unit, psnr, seconds=10.0, num_adapted=76, val=(0.5, 0.4)):
    path = script.record_path(out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"psnr": psnr, "seconds": seconds, "num_adapted": num_adapted,
                                "val_loss_zero": val[0], "val_loss_best": val[1]}))


def test_report_gains_are_the_per_slice_differences_from_the_unadapted_prior(tmp_path):
    script = load_script("studies/calibration_screen.py")
    cell = "brain_knee_4x"  # 2 val slices
    for s, (base, fam) in enumerate([(30.0, 31.5), (32.0, 32.0)]):
        _write(script, tmp_path, (cell, "unadapted", "none", s), base, seconds=40.0, num_adapted=0, val=(None, None))
        _write(script, tmp_path, (cell, "norm_affine", "heldout", s), fam, seconds=200.0 + s,
               val=(0.5, 0.4) if s == 0 else (0.5, 0.5))
    table = script.report(tmp_path, [cell], ["norm_affine", "bands"], ["heldout"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    variables, gains, mean = rows["norm_affine"]
    assert variables == "76" and mean == "+0.75"
    assert gains == "+0.75 (+1.50, +0.00; 1/2 kept; 200 s)"  # the guard kept γ where its loss fell
    assert rows["bands"][1] == "…"  # no records yet: not a number
    assert "unadapted 31.00 dB (40 s/slice)" in table


def test_bad_cells_rows_and_losses_exit_2_naming_the_key(tmp_path, capsys):
    script = load_script("studies/calibration_screen.py")
    for argv, key in ((["--cells", "brain_knee_5x"], "'--cells'"), (["--rows", "magic"], "'--rows'"),
                      (["--rows", "norm_affine:magic=1"], "'magic=1'"),
                      (["--rows", "norm_affine:split_ratio=2"], "split_ratio must be in (0, 1)"),
                      (["--losses", "reference"], "'--losses'"),
                      (["--rows", "finetune", "--losses", "oracle,pooled"], "'finetune' has adapt='full'"),
                      (["--rows", "norm_affine:adapt=none", "--losses", "pooled"], "adapt='none'")):
        assert script.main([*argv, "--out", str(tmp_path / "o")]) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rows_name_a_family_and_any_biasrecon_setting():
    script = load_script("studies/calibration_screen.py")
    name, change = script.row_settings("norm_affine@0.02+k3:split_ratio=0.25:guard_scales=0.25/1/1.5"
                                       ":step_selection=last:theta_steps=6")
    assert name == "norm_affine"
    assert change == {"lr": 0.02, "guard_splits": 3, "split_ratio": 0.25, "guard_scales": (0.25, 1.0, 1.5),
                      "step_selection": "last", "theta_steps": 6}
    path = script.record_path(tmp := script.Path("o"), ("c", "norm_affine:guard_scales=0.5/1", "heldout", 0))
    assert path.parent.name == "norm_affine:guard_scales=0.5_1__heldout" and path.parent.parent == tmp / "records" / "c"


def test_pooled_units_share_one_gamma_calibrated_once_on_all_the_cells_slices(tmp_path, monkeypatch):
    """Loss ``pooled``: γ is fitted once, by BiasRecon's calibration on a batch of every slice of the cell (the
    site's shift), and each slice's record is its reconstruction with that same γ fixed."""
    from recon.biasrecon import BiasReconSettings
    from recon.data.sample import Sample
    from tests.recon.test_biasrecon import SETTINGS, BlurDenoiser, _problem  # a miscalibrated prior, a scan

    script = load_script("studies/calibration_screen.py")

    class Tiny(script.Data):
        def sample(self, cell, index):
            op, y, image, sigma = _problem(seed=index)
            truth = image.abs()[0, 0]
            return Sample(y[0], op.mask, truth, None, f"tiny{index}.h5", 0, "", None, sigma, 1.0, truth)

        def maps(self, cell, index):
            return _problem(seed=index)[0].sens_maps[0]

        def prior(self, name):
            return self.priors.setdefault(name, BlurDenoiser())

    monkeypatch.setitem(script.CELLS, "tiny", script.Cell("tiny", "blur", "none", (), 3))
    monkeypatch.setattr(script, "SETTINGS", BiasReconSettings(**SETTINGS))  # BiasRecon's tests' small schedule
    batches = []
    calibrate = script.BiasRecon.calibrate
    monkeypatch.setattr(script.BiasRecon, "calibrate",
                        lambda self, *a, **k: (self.params and batches.append(self.y.shape[0]), calibrate(self, *a, **k))[1])
    data = Tiny(tmp_path)
    records = [script.run(data, ("tiny", "conv_gain", "pooled", s)) for s in range(3)]
    assert batches == [3]  # one calibration, on the batch of all three slices; the reconstructions fit nothing
    assert (tmp_path / "records" / "tiny" / "conv_gain__pooled" / "gamma.pt").exists()
    assert all(r["gamma"] == records[0]["gamma"] and r["num_adapted"] == 1 for r in records)
    assert records[0]["gamma"] != [0.0] and records[0]["val_loss_best"] < records[0]["val_loss_zero"]
