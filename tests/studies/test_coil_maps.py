"""studies/coil_maps.py: its map error is phase-free and sees only the true maps' part outside the estimate's span,
and bad input exits 2 naming the option before anything is computed or written."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_script


def test_map_error_is_zero_up_to_a_phase_per_pixel_and_one_where_the_estimate_is_zero():
    script = load_script("studies/coil_maps.py")
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(4, 6, 5, dtype=torch.complex64, generator=g)
    phase = torch.exp(1j * torch.rand(6, 5, generator=g) * 6.28).to(torch.complex64)
    inside = torch.ones(6, 5, dtype=torch.bool)
    assert script.map_error(truth * phase * 0.3, truth, inside) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 6, 5, dtype=torch.complex64, generator=g)
    # a pixel's error is the share of the truth's energy outside the estimate's (one-dimensional) span
    expected = 1 - ((other.conj() * truth).sum(0).abs() ** 2
                    / (other.abs().pow(2).sum(0) * truth.abs().pow(2).sum(0))).mean()
    assert script.map_error(other, truth, inside) == pytest.approx(float(expected), rel=1e-4)
    cropped = truth.clone()
    cropped[:, :3] = 0  # zeroed by the crop: all of the truth is missed there
    assert script.map_error(cropped, truth, inside) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--cells", "nowhere"], "unknown cell(s) nowhere"),
    (["--cells", "val4_knee_epi_4x", "--crops", "1.5"], "--crops '1.5'"),
    (["--cells", "val4_knee_epi_4x", "--blocks", "circle"], "--blocks 'circle'"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, fragment):
    script = load_script("studies/coil_maps.py")
    code = script.run_main(script.main, argv + ["--screen-out", str(tmp_path / "screen")])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "screen").exists()


def test_an_existing_out_file_is_not_overwritten(tmp_path, capsys):
    script = load_script("studies/coil_maps.py")
    out = tmp_path / "records.json"
    out.write_text("mine")
    code = script.run_main(script.main, ["--cells", "val4_knee_epi_4x", "--out", str(out),
                                         "--screen-out", str(tmp_path / "screen")])
    assert code == 2 and "is not overwritten" in capsys.readouterr().err and out.read_text() == "mine"
