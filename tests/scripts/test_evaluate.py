"""scripts/evaluate.py on a tiny simulated site: the oracle row is the best λ of the grid against the clean
reference, every row's numbers are those of the reconstructions recomputed by hand, and bad input exits 2."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from recon.biasrecon import BiasRecon
from recon.coils import sensitivity_maps
from recon.methods import prior_settings, run_baseline, slice_scores
from recon.operators import Sense
from scores.priors import load_prior, resolve_prior
from scores.samplers import TweedieSampler
from tests.conftest import load_script

SITE = ["acquisition.matrix=[34,34]", "data.num_subjects=1", "data.slices_per_subject=2", "coils.count=6",
        "acquisition.center_fraction=0.25", "acquisition.acceleration=3"]
evaluate = load_script("scripts/evaluate.py")


def test_rows_are_the_recomputed_scores_and_the_oracle_is_the_best_grid_point(tmp_path, single_thread):
    settings = evaluate.settings_from_dotlist(["num_steps=2", "sure=false"])
    grid = (0.001, 0.01, 0.1)
    rows = evaluate.evaluate_site("source_brain", ["tv", "unadapted"], 2, resolve_prior("source_brain"), tmp_path,
                                  settings, SITE, grid)
    samples = evaluate._open("source_brain", SITE, 2, tmp_path)
    maps = [sensitivity_maps(s) for s in samples]
    by_lam = {lam: [slice_scores(s, run_baseline("tv", s, m, lam=lam).image)["reference"] for s, m in zip(samples, maps)]
              for lam in grid}
    best = max(grid, key=lambda lam: np.mean([p for p, _ in by_lam[lam]]))
    tv = rows[0]["scores"]["reference"]
    assert tv["psnr"][0] == pytest.approx(np.mean([p for p, _ in by_lam[best]]), abs=1e-6)
    assert tv["ssim"][0] == pytest.approx(np.mean([q for _, q in by_lam[best]]), abs=1e-6)
    assert f"oracle λ={best:g}" in rows[0]["params"]
    op = Sense(torch.stack(maps), torch.stack([s.mask for s in samples])[:, None])
    result = BiasRecon(load_prior(resolve_prior("source_brain")).model, op, torch.stack([s.kspace for s in samples]),
                       prior_settings(settings, "unadapted"), sampler=TweedieSampler()).run()
    by_hand = [slice_scores(s, im)["target"][0] for s, im in zip(samples, result.image[:, 0])]
    assert rows[1]["scores"]["target"]["psnr"][0] == pytest.approx(np.mean(by_hand), abs=1e-6)
    assert rows[1]["n"] == 2 and "2 levels" in rows[1]["params"]


def test_bad_method_and_prior_exit_2(tmp_path, capsys):
    assert evaluate.main(["--sites", "source_brain", "--methods", "tv,fancy", "--workdir", str(tmp_path)]) == 2
    assert "'fancy'" in capsys.readouterr().err
    assert evaluate.main(["--sites", "source_brain", "--prior", str(tmp_path / "none.safetensors"),
                          "--workdir", str(tmp_path)]) == 2
    assert "--prior" in capsys.readouterr().err
