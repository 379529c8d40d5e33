"""Training: DSM loss decreases, exact resume, time limit, augmentation, script errors, DDP parity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scores.checkpoints import load_checkpoint
from scores.config import load_prior_config
from scores.model import ScoreModel, complex_noise
from scores.train import (
    CHECKPOINT_NAME,
    STATE_NAME,
    augment_dihedral,
    dsm_loss,
    random_crops,
    validation_loss,
    dsm_loss_per_sample,
    sample_training_sigmas,
    train,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "prior" / "tiny.yaml"
QUIET = ["train.num_grid_samples=1", "train.grid_sampler_steps=2"]


def _eval_loss(model: ScoreModel, images: torch.Tensor) -> float:
    """DSM loss on fixed noise levels and noise (same draws for every model)."""
    g = torch.Generator().manual_seed(123)
    sigma = torch.exp(torch.linspace(-4.0, 1.5, 8)).repeat_interleave(images.shape[0])
    x0 = images.repeat(8, 1, 1, 1)
    noise = complex_noise(x0.shape, g)
    with torch.no_grad():
        return dsm_loss_per_sample(model, x0, sigma, noise, model.sigma_data).mean().item()


def test_dsm_loss_decreases_on_tiny_dataset(tmp_path: Path, blobs16: torch.Tensor) -> None:
    cfg = load_prior_config(TINY, ["train.steps=150", "train.checkpoint_every=1000", *QUIET])
    fresh = ScoreModel.from_config(cfg.network, generator=torch.Generator().manual_seed(cfg.train.seed)).eval()
    result = train(cfg, blobs16, tmp_path, progress=False)
    before, after = _eval_loss(fresh, blobs16), _eval_loss(result.model, blobs16)
    assert result.step == 150 and not result.stopped_by_time_limit
    assert after < 0.6 * before, (before, after)
    loaded, meta = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert meta["step"] == 150 and len(meta["data_hash"]) == 64
    assert _eval_loss(loaded, blobs16) == pytest.approx(after, rel=1e-6)
    for name in ("loss.csv", "loss_curve.png", "samples_step0000150.png", STATE_NAME):
        assert (tmp_path / name).stat().st_size > 0


def test_resume_continues_exactly(tmp_path: Path, blobs16: torch.Tensor) -> None:
    common = ["train.checkpoint_every=1000", "train.log_every=1", *QUIET]
    straight = train(load_prior_config(TINY, ["train.steps=6", *common]), blobs16, tmp_path / "a", progress=False)
    train(load_prior_config(TINY, ["train.steps=3", *common]), blobs16, tmp_path / "b", progress=False)
    resumed = train(load_prior_config(TINY, ["train.steps=6", *common]), blobs16, tmp_path / "b", progress=False)
    assert resumed.step == 6
    a, b = load_file(str(tmp_path / "a" / STATE_NAME)), load_file(str(tmp_path / "b" / STATE_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in resumed.losses] == pytest.approx([v for _, v in straight.losses], rel=1e-6)


def test_resume_refuses_other_data(tmp_path: Path, blobs16: torch.Tensor) -> None:
    from scores.checkpoints import CheckpointError

    cfg = load_prior_config(TINY, ["train.steps=1", *QUIET])
    train(cfg, blobs16, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="data_hash"):
        train(cfg, blobs16[:8], tmp_path, progress=False)


def test_time_limit_stops_cleanly(tmp_path: Path, blobs16: torch.Tensor) -> None:
    cfg = load_prior_config(TINY, ["train.steps=100000", *QUIET])
    result = train(cfg, blobs16, tmp_path, time_limit=1.0, progress=False)
    assert result.stopped_by_time_limit and 0 < result.step < 100000
    _, meta = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert meta["step"] == result.step


def test_augmentation_applies_a_dihedral_transform_per_image() -> None:
    x = complex_noise((64, 1, 5, 5), torch.Generator().manual_seed(0))
    out = augment_dihedral(x, torch.Generator().manual_seed(1))
    seen = set()
    for b in range(64):
        variants = []
        for flip in (False, True):
            base = torch.flip(x[b], dims=(-1,)) if flip else x[b]
            variants += [torch.rot90(base, k, dims=(-2, -1)) for k in range(4)]
        matches = [i for i, v in enumerate(variants) if torch.equal(out[b], v)]
        assert matches, b
        seen.add(matches[0])
    assert len(seen) == 8  # all eight transforms occur
    rect = complex_noise((16, 1, 4, 6), torch.Generator().manual_seed(2))
    out = augment_dihedral(rect, torch.Generator().manual_seed(3))
    assert out.shape == rect.shape
    for b in range(16):
        assert any(torch.equal(out[b], torch.flip(rect[b], dims=d)) if d else torch.equal(out[b], rect[b])
                   for d in ((), (-1,), (-2,), (-2, -1)))


def test_training_sigmas_stay_in_schedule() -> None:
    g = torch.Generator().manual_seed(0)
    s = sample_training_sigmas(20000, g, sigma_min=0.01, sigma_max=10.0, sampling="loguniform")
    assert s.min() >= 0.01 and s.max() <= 10.0
    assert abs(torch.log(s).mean().item() - (np.log(0.01) + np.log(10.0)) / 2) < 0.05
    s = sample_training_sigmas(20000, g, sigma_min=0.01, sigma_max=10.0, sampling="lognormal")
    assert s.min() >= 0.01 and s.max() <= 10.0 and abs(torch.log(s).median().item() + 1.2) < 0.05
    model = ScoreModel.from_config(load_prior_config(TINY).network)
    assert torch.isfinite(dsm_loss(model, complex_noise((2, 1, 8, 8), g), g))


def _script(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, *(launcher or []), str(REPO / "scripts" / "train_score.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_script_reports_bad_config_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _script(["--config", str(TINY), "--out", str(out), "train.no_such_key=3"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "train.no_such_key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    bad = tmp_path / "real.npy"
    np.save(bad, np.ones((2, 8, 8), dtype=np.float32))
    proc = _script(["--config", str(TINY), "--out", str(out), "--images", str(bad)])
    assert proc.returncode == 2 and "expected complex" in proc.stderr and not out.exists()


def test_torchrun_two_processes_match_one_process(tmp_path: Path, blobs16: torch.Tensor) -> None:
    """2 CPU processes (gloo) with global batch 8 give the same weights as 1 process with batch 8."""
    images = tmp_path / "images.npy"
    np.save(images, blobs16.numpy())
    args = ["--images", str(images), "--config", str(TINY), "--no-progress", "train.steps=4", "train.batch_size=8",
            "train.log_every=1", "train.checkpoint_every=1000", "train.warmup_steps=1", *QUIET]
    one = _script([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _script([*args, "--out", str(tmp_path / "two")],
                  launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert two.returncode == 0, two.stderr
    a, b = load_file(str(tmp_path / "one" / STATE_NAME)), load_file(str(tmp_path / "two" / STATE_NAME))
    init = ScoreModel.from_config(load_prior_config(TINY).network, generator=torch.Generator().manual_seed(0))
    moved = max((a[f"model.{k}"] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-3  # training changed the weights far more than the tolerance below
    for key in a:
        if key.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    log_one = (tmp_path / "one" / "loss.csv").read_text().splitlines()[1:]
    log_two = (tmp_path / "two" / "loss.csv").read_text().splitlines()[1:]
    assert len(log_one) == len(log_two) == 4
    for r1, r2 in zip(log_one, log_two):
        assert float(r1.split(",")[1]) == pytest.approx(float(r2.split(",")[1]), rel=1e-4)


def test_random_crops_are_windows_of_the_drawn_images() -> None:
    images = torch.arange(5 * 20 * 14, dtype=torch.float32).reshape(5, 1, 20, 14).to(torch.complex64)
    index = torch.tensor([4, 0, 4, 2, 1, 3])
    crops = random_crops(images, index, 9, torch.Generator().manual_seed(3))
    assert crops.shape == (6, 1, 9, 9)
    for crop, i in zip(crops, index.tolist()):
        first = int(crop[0, 0, 0].real)  # values encode (image, row, column)
        image, rest = divmod(first, 20 * 14)
        row, col = divmod(rest, 14)
        assert image == i and 0 <= row <= 20 - 9 and 0 <= col <= 14 - 9
        assert torch.equal(crop, images[i, :, row:row + 9, col:col + 9])
    again = random_crops(images, index, 9, torch.Generator().manual_seed(3))
    assert torch.equal(crops, again)
    with pytest.raises(ValueError, match="patch_size"):
        random_crops(images, index, 15, None)


def test_patch_training_denoises_larger_whole_images(tmp_path: Path, blobs32: torch.Tensor,
                                                     blobs48x40: torch.Tensor) -> None:
    """Trained on 16x16 crops of 32x32 images, the fully convolutional prior denoises whole 48x40 images better
    than before training, and logs its validation loss on them at each checkpoint."""
    cfg = load_prior_config(TINY, ["train.steps=120", "train.checkpoint_every=60", "train.patch_size=16",
                                   "network.attention=false", *QUIET])
    fresh = ScoreModel.from_config(cfg.network, generator=torch.Generator().manual_seed(cfg.train.seed)).eval()
    result = train(cfg, blobs32, tmp_path, progress=False, val_images=blobs48x40)
    levels = (0.1, 0.5, 1.0)  # a 120-step tiny prior learns these; its finest levels need longer training
    before = validation_loss(fresh, blobs48x40, fresh.sigma_data, levels)
    after = validation_loss(result.model, blobs48x40, result.model.sigma_data, levels)
    assert after < 0.75 * before, (before, after)
    logged = validation_loss(result.model, blobs48x40, result.model.sigma_data)  # the default levels
    assert [s for s, _ in result.val_losses] == [60, 120] and result.val_losses[-1][1] == pytest.approx(logged)
    denoised = result.model.denoise(blobs48x40, 0.1)
    assert denoised.shape == blobs48x40.shape and bool(torch.isfinite(torch.view_as_real(denoised)).all())
    _, meta = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert meta["val_loss"] == pytest.approx(logged) and meta["train_seconds"] > 0
    assert (tmp_path / "val_loss.csv").read_text().splitlines()[1:] == [f"60,{result.val_losses[0][1]:.6g}",
                                                                       f"120,{result.val_losses[1][1]:.6g}"]
    with pytest.raises(ValueError, match="patch_size"):
        train(load_prior_config(TINY, ["train.patch_size=40", *QUIET]), blobs32, tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()


def test_warm_start_copies_weights_and_drops_the_attention(tmp_path: Path, blobs16: torch.Tensor) -> None:
    from scores.checkpoints import CheckpointError, warm_start

    source_cfg = load_prior_config(TINY, ["network.attention=true", "train.steps=3", *QUIET])
    train(source_cfg, blobs16, tmp_path / "source", progress=False)
    source, _ = load_checkpoint(tmp_path / "source" / CHECKPOINT_NAME)
    plain_cfg = load_prior_config(TINY, ["network.attention=false"])
    model = ScoreModel.from_config(plain_cfg.network)
    facts = warm_start(model, tmp_path / "source" / CHECKPOINT_NAME)
    weights = source.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert facts["init_dropped"] and all(".attention." in n for n in facts["init_dropped"])
    assert facts["init_step"] == 3 and len(facts["init_sha256"]) == 64
    wider = ScoreModel.from_config(load_prior_config(TINY, ["network.base_channels=12"]).network)
    with pytest.raises(CheckpointError, match="train.init_from"):
        warm_start(wider, tmp_path / "source" / CHECKPOINT_NAME)
    # through train(): the first step starts from the source's weights and the metadata says so
    cfg = load_prior_config(TINY, ["network.attention=false", "train.steps=1", "train.init_from=mine", *QUIET])
    train(cfg, blobs16, tmp_path / "tuned", progress=False, init_checkpoint=tmp_path / "source" / CHECKPOINT_NAME)
    _, meta = load_checkpoint(tmp_path / "tuned" / CHECKPOINT_NAME)
    assert meta["init_from"] == "mine" and meta["init_sha256"] == facts["init_sha256"]
