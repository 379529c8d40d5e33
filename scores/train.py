"""Denoising score matching for the complex-image prior: EDM loss, EMA, AdamW, resumable, data-parallel.

Determinism: all randomness of step ``k`` (which images, flips/rotations, noise levels, noise) is
drawn from a generator seeded with ``(train.seed, k)`` for the whole global batch, on every process.
A data-parallel process then keeps its contiguous share of the batch, so ``N`` processes with global
batch ``B`` compute the same update as one process with batch ``B`` (up to float summation order),
and a resumed run continues exactly where the saved one stopped.

Launch data-parallel training with ``torchrun --nproc_per_node=N scripts/train_score.py ...``: when the
environment holds ``WORLD_SIZE > 1`` the process group is initialised (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from scores.checkpoints import (
    CheckpointError,
    data_hash,
    load_training_state,
    read_metadata,
    save_checkpoint,
    save_training_state,
    warm_start,
)
from scores.config import PriorConfig, prior_config_to_dict
from scores.model import ScoreModel, complex_noise
from scores.samplers import sample_tweedie_dc
from scores.sde import build_schedule

__all__ = [
    "dsm_loss",
    "dsm_loss_per_sample",
    "edm_weight",
    "sample_training_sigmas",
    "augment_dihedral",
    "random_crops",
    "validation_loss",
    "TrainResult",
    "train",
    "CHECKPOINT_NAME",
    "STATE_NAME",
    "LOSS_LOG_NAME",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "training_state.safetensors"
LOSS_LOG_NAME = "loss.csv"
VAL_LOG_NAME = "val_loss.csv"
VAL_SIGMAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Noise levels of the validation loss: the range a reconstruction's sampler walks through."""
_SEED_STRIDE = 1_000_003  # step seeds: seed * stride + step


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight making the effective training target unit-variance at every noise level.

    Maths: ``w(s) = (s^2 + sd^2) / (s sd)^2``. Shape: ``(B,) -> (B,)``.
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None,
    *,
    sigma_min: float,
    sigma_max: float,
    sampling: str = "lognormal",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw training noise levels.

    Maths: ``log s ~ N(p_mean, p_std^2)`` clamped to ``[sigma_min, sigma_max]`` ("lognormal", EDM), or
    ``log s ~ U(log sigma_min, log sigma_max)`` ("loguniform", Song et al.'s VE).
    Shape: ``(batch,)`` float32.
    """
    u = torch.randn(batch, generator=generator, device=device)
    if sampling == "lognormal":
        return torch.exp(p_mean + p_std * u).clamp(sigma_min, sigma_max)
    if sampling == "loguniform":
        r = torch.rand(batch, generator=generator, device=device)
        return torch.exp(math.log(sigma_min) + r * (math.log(sigma_max) - math.log(sigma_min)))
    raise ValueError(f"Unknown sigma sampling {sampling!r}; expected 'lognormal' or 'loguniform'.")


def dsm_loss_per_sample(
    model: nn.Module, x0: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float
) -> Tensor:
    """EDM-weighted denoising score matching loss of each sample.

    Maths: ``l_b = w(s_b) mean_{pixels, re/im} |D(x0_b + s_b z_b, s_b) - x0_b|^2``, ``w`` from :func:`edm_weight`.
    Shape: ``x0, noise`` complex ``(B, 1, H, W)``, ``sigma`` ``(B,)`` -> ``(B,)`` float32.

    Args:
        model: a ScoreModel, or a wrapper (DDP) whose ``forward(x, sigma)`` is the denoiser.
    """
    x = x0 + sigma[:, None, None, None] * noise
    denoised = model(x, sigma)
    err = torch.view_as_real(denoised - x0).float().pow(2).mean(dim=(1, 2, 3, 4))
    return edm_weight(sigma.float(), sigma_data) * err


def dsm_loss(
    model: ScoreModel,
    x0: Tensor,
    generator: torch.Generator | None = None,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    sampling: str = "lognormal",
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> Tensor:
    """Batch-mean denoising score matching loss with random noise levels and noise from ``generator``.

    Maths: ``E_{s, z} w(s) |D(x0 + s z, s) - x0|^2 / (2 H W)``, ``s`` from :func:`sample_training_sigmas`.
    Shape: ``x0`` complex ``(B, 1, H, W)`` -> scalar.
    """
    sigma = sample_training_sigmas(
        x0.shape[0], generator, sigma_min=sigma_min, sigma_max=sigma_max, sampling=sampling,
        p_mean=p_mean, p_std=p_std, device=x0.device,
    )
    noise = complex_noise(x0.shape, generator, x0.device)
    return dsm_loss_per_sample(model, x0, sigma, noise, model.sigma_data).mean()


def augment_dihedral(
    images: Tensor, generator: torch.Generator | None, *, flips: bool = True, rotations: bool = True
) -> Tensor:
    """Random flips and 90-degree rotations, independently per image (batched, no host sync).

    Rotations are applied only to square images (they would change ``H, W`` otherwise).
    Maths: ``x_b <- rot90^{k_b}(flip_W^{c_b} flip_H^{a_b} x_b)``, ``a, c ~ U{0, 1}``, ``k ~ U{0..3}``.
    Shape: ``(B, C, H, W)`` unchanged.
    """
    batch = images.shape[0]
    draws = torch.randint(0, 2, (batch, 2), generator=generator, device=images.device)
    krot = torch.randint(0, 4, (batch,), generator=generator, device=images.device)

    def where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask[:, None, None, None], a, b)

    x = images
    if flips:
        x = where(draws[:, 0].bool(), x.flip(-2), x)
        x = where(draws[:, 1].bool(), x.flip(-1), x)
    if rotations and x.shape[-1] == x.shape[-2]:
        out = x
        turned = x
        for k in (1, 2, 3):
            turned = torch.rot90(turned, 1, dims=(-2, -1))
            out = where(krot == k, turned, out)
        x = out
    return x


@torch.no_grad()
def validation_loss(model: nn.Module, images: Tensor, sigma_data: float, sigmas: tuple[float, ...] = VAL_SIGMAS,
                    seed: int = 0, batch: int = 4) -> float:
    """Denoising loss of whole validation images at fixed noise levels, with a fixed noise draw.

    Maths: ``mean_{i, s} w(s) mean_{pixels, re/im} |D(x_i + s z_{i,s}, s) − x_i|²`` over ``s ∈ sigmas``
    (``w`` from :func:`edm_weight`), ``z`` from a generator seeded with ``seed``: the same number for
    the same model, so checkpoints compare.
    Shape: ``images`` complex ``(N, 1, H, W)`` → a float.
    """
    gen = torch.Generator(device=images.device).manual_seed(seed)
    total, count = 0.0, 0
    for s in sigmas:
        for start in range(0, images.shape[0], batch):
            x0 = images[start:start + batch]
            noise = complex_noise(x0.shape, gen, images.device)
            sigma = torch.full((x0.shape[0],), float(s), device=images.device)
            total += float(dsm_loss_per_sample(model, x0, sigma, noise, sigma_data).sum())
            count += x0.shape[0]
    return total / count


@dataclass
class TrainResult:
    """What :func:`train` returns: the EMA model, the step reached and where outputs are."""

    model: ScoreModel
    step: int
    out_dir: Path
    checkpoint: Path
    losses: list[tuple[int, float]]
    stopped_by_time_limit: bool
    val_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if dist.is_initialized() else torch.cuda.current_device())
    return device


def _init_distributed(device_name: str) -> tuple[int, int, int, bool]:
    """Initialise the process group when launched by torchrun; returns (rank, world, local_rank, created)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_loss_log(path: Path, losses: list[tuple[int, float]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss"])
    writer.writerows((s, f"{v:.6g}") for s, v in losses)
    _atomic_write_bytes(path, buf.getvalue().encode())


def _read_loss_log(path: Path, up_to_step: int) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [(int(r["step"]), float(r["loss"])) for r in rows if int(r["step"]) <= up_to_step]


def _figure_png(draw: Callable[[Any], None], figsize: tuple[float, float]) -> bytes:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without pyplot's global state

    fig = Figure(figsize=figsize)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _save_sample_grid(path: Path, samples: Tensor) -> None:
    """PNG grid of sample magnitudes on one grey scale (0 to the 99.5th percentile)."""
    mags = samples.abs()[:, 0].float().cpu()
    n = mags.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    vmax = float(torch.quantile(mags.flatten()[:1_000_000], 0.995)) or 1.0

    def draw(fig: Any) -> None:
        for i in range(rows * cols):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.axis("off")
            if i < n:
                ax.imshow(mags[i].numpy(), cmap="gray", vmin=0.0, vmax=vmax)
        fig.subplots_adjust(0.01, 0.01, 0.99, 0.99, 0.02, 0.02)

    _atomic_write_bytes(path, _figure_png(draw, (1.6 * cols, 1.6 * rows)))


def _save_loss_curve(path: Path, losses: list[tuple[int, float]], val_losses: list[tuple[int, float]]) -> None:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        if losses:
            ax.plot([s for s, _ in losses], [v for _, v in losses], label="training batches")
        if val_losses:
            ax.plot([s for s, _ in val_losses], [v for _, v in val_losses], "o-", label="validation (EMA, fixed noise)")
            ax.legend()
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("DSM loss (EDM-weighted)")
        ax.grid(True, alpha=0.3)

    _atomic_write_bytes(path, _figure_png(draw, (6.0, 4.0)))


def _lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1.0 + step) / (10.0 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)


def random_crops(images: Tensor, index: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """Square crops at uniformly random positions, one per drawn image.

    Maths: crop ``b`` is ``images[index_b, :, r_b : r_b + P, c_b : c_b + P]``, ``r_b ~ U{0..H−P}``,
    ``c_b ~ U{0..W−P}``.
    Shape: ``images`` ``(N, C, H, W)``, ``index`` ``(B,)`` → ``(B, C, P, P)``, ``P = size ≤ min(H, W)``.
    """
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"train.patch_size={size} is larger than the training images ({height} x {width}).")
    rows = torch.randint(0, height - size + 1, (index.shape[0],), generator=generator, device=images.device)
    cols = torch.randint(0, width - size + 1, (index.shape[0],), generator=generator, device=images.device)
    return torch.stack([images[i, :, r:r + size, c:c + size] for i, r, c in zip(index.tolist(), rows.tolist(),
                                                                               cols.tolist())])


def _global_batch(
    images: Tensor, step: int, cfg: PriorConfig, schedule_range: tuple[float, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """All random draws of one step, for the whole global batch, from a generator seeded by (seed, step)."""
    t = cfg.train
    gen = torch.Generator(device=images.device)
    gen.manual_seed(t.seed * _SEED_STRIDE + step)
    index = torch.randint(0, images.shape[0], (t.batch_size,), generator=gen, device=images.device)
    drawn = images[index] if t.patch_size is None else random_crops(images, index, t.patch_size, gen)
    x0 = augment_dihedral(drawn, gen, flips=t.augment_flips, rotations=t.augment_rotations)
    sigma = sample_training_sigmas(
        t.batch_size, gen, sigma_min=schedule_range[0], sigma_max=schedule_range[1], sampling=t.sigma_sampling,
        p_mean=t.p_mean, p_std=t.p_std, device=images.device,
    )
    noise = complex_noise(x0.shape, gen, images.device)
    return x0, sigma, noise


def _check_images(images: Tensor) -> None:
    if not torch.is_complex(images) or images.ndim != 4 or images.shape[1] != 1 or images.shape[0] < 1:
        raise ValueError(
            f"train expects complex training images of shape (N, 1, H, W), got {images.dtype} {tuple(images.shape)}."
        )


def train(
    config: PriorConfig,
    images: Tensor,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    time_limit: float | None = None,
    resume: bool = True,
    progress: bool = True,
    val_images: Tensor | None = None,
    init_checkpoint: str | Path | None = None,
) -> TrainResult:
    """Train a ScoreModel by denoising score matching on normalised complex images.

    Maths: minimise ``E_{x0, s, z} w(s) |D_theta(x0 + s z, s) - x0|^2`` with AdamW (linear warm-up),
    gradient clipping and EMA ``theta_ema <- d theta_ema + (1 - d) theta``.
    Shape: ``images`` complex64 ``(N, 1, H, W)``, normalised as documented in :class:`~scores.model.ScoreModel`.

    Writes to ``out_dir`` (rank 0 only, every file atomically): ``checkpoint.safetensors`` (EMA weights +
    metadata), ``training_state.safetensors`` (for resume), ``samples_step<k>.png`` at each checkpoint,
    ``loss.csv`` (and ``val_loss.csv``) and, at the end, ``loss_curve.png``.

    Args:
        config: the full prior config (network, sde, train; data is only recorded).
        images: training images, on any device (moved to the training device).
        out_dir: output folder.
        metadata: extra checkpoint metadata (e.g. ``git_commit``).
        time_limit: seconds of wall time after which training stops cleanly and saves.
        resume: continue from ``out_dir/training_state.safetensors`` if present.
        progress: tqdm progress bar on rank 0.
        val_images: complex ``(M, 1, H', W')`` validation images (whole slices): at every checkpoint the
            EMA model's :func:`validation_loss` is logged to ``val_loss.csv`` and stored in the metadata.
        init_checkpoint: a prior's checkpoint to start from (``train.init_from`` resolved to a file):
            :func:`~scores.checkpoints.warm_start`, its provenance stored in the metadata (not on resume).

    Returns:
        A :class:`TrainResult` with the EMA model (eval mode) and the step reached.

    Raises:
        ValueError: bad images, a patch larger than them, or a batch size not divisible by the number of processes.
        CheckpointError: a training state to resume from that belongs to other data or another network.
    """
    start = time.monotonic()
    _check_images(images)
    cfg, t = config, config.train
    if t.patch_size is not None and t.patch_size > min(images.shape[-2:]):
        raise ValueError(f"train.patch_size={t.patch_size} is larger than the training images {tuple(images.shape[-2:])}.")
    rank, world, local_rank, created_group = _init_distributed(t.device)
    try:
        device = _resolve_device(t.device, local_rank)
        if t.batch_size % world != 0:
            raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the {world} processes.")
        out = Path(out_dir)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        schedule = build_schedule(
            cfg.sde.kind, sigma_min=cfg.sde.sigma_min, sigma_max=cfg.sde.sigma_max,
            beta_min=cfg.sde.beta_min, beta_max=cfg.sde.beta_max, t_min=cfg.sde.t_min,
        )
        digest = data_hash(images)
        images = images.to(device=device, dtype=torch.complex64)

        model = ScoreModel.from_config(cfg.network, generator=torch.Generator().manual_seed(t.seed))
        extra = dict(metadata or {})
        if init_checkpoint is not None:
            extra.update(warm_start(model, init_checkpoint), init_from=t.init_from or str(init_checkpoint))
        model = model.to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=(t.betas[0], t.betas[1]), weight_decay=t.weight_decay
        )
        step = 0
        config_dict = prior_config_to_dict(cfg)
        state_path, ckpt_path, log_path = out / STATE_NAME, out / CHECKPOINT_NAME, out / LOSS_LOG_NAME
        if resume and state_path.is_file():
            stored = read_metadata(state_path)
            if stored.get("data_hash") != digest:
                raise CheckpointError(
                    f"{state_path}: metadata key 'data_hash' differs from the training images' hash; "
                    "expected a training state of the same data (use another --out folder)."
                )
            for section in ("network", "sde"):
                if stored.get("config", {}).get(section) != config_dict[section]:
                    raise CheckpointError(
                        f"{state_path}: config section '{section}' differs from the current config; "
                        "expected the same network and noise schedule to resume."
                    )
            meta = load_training_state(state_path, model, ema, optimizer)
            step = int(meta["step"])
        losses = _read_loss_log(log_path, step) if rank == 0 else []
        val_path = out / VAL_LOG_NAME
        val_losses = _read_loss_log(val_path, step) if rank == 0 and val_images is not None else []
        if val_images is not None:
            _check_images(val_images)
            val_images = val_images.to(device=device, dtype=torch.complex64)
        started = time.monotonic()
        seconds_before = float(read_metadata(state_path).get("train_seconds", 0.0)) if step else 0.0

        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        shard = slice(rank * t.batch_size // world, (rank + 1) * t.batch_size // world)
        autocast = t.mixed_precision and device.type == "cuda"
        sigma_range = (schedule.sigma_min, schedule.sigma_max)

        def save(at_step: int) -> None:
            if rank != 0:
                return
            meta = {**extra, "config": config_dict, "step": at_step, "data_hash": digest,
                    "train_seconds": round(seconds_before + time.monotonic() - started, 1)}
            if val_images is not None:
                if not val_losses or val_losses[-1][0] != at_step:
                    val_losses.append((at_step, validation_loss(ema, val_images, model.sigma_data, seed=t.seed)))
                meta["val_loss"] = val_losses[-1][1]
                _write_loss_log(val_path, val_losses)
            save_training_state(state_path, model, ema, optimizer, meta)
            save_checkpoint(ckpt_path, ema, meta)
            _write_loss_log(log_path, losses)
            h, w = images.shape[-2:]
            samples = sample_tweedie_dc(
                ema, (t.num_grid_samples, 1, h, w), schedule.sigmas(t.grid_sampler_steps), eta=0.0,
                generator=torch.Generator(device=device).manual_seed(t.seed), device=device,
            )
            _save_sample_grid(out / f"samples_step{at_step:07d}.png", samples)

        window: list[Tensor] = []

        def flush_window() -> None:
            # mean loss since the last log line over the global batch (all processes take part)
            mean_loss = torch.stack(window).mean()
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss = mean_loss / world
            window.clear()
            if rank == 0:
                losses.append((step, float(mean_loss)))
                bar.set_postfix(loss=f"{float(mean_loss):.4f}")

        bar = tqdm(total=t.steps, initial=step, desc="train", disable=not progress or rank != 0, dynamic_ncols=True)
        stopped = False
        model.train()
        while step < t.steps:
            stop = time_limit is not None and time.monotonic() - start > time_limit
            if world > 1:
                flag = torch.tensor([int(stop)], device=device)
                dist.broadcast(flag, src=0)
                stop = bool(flag.item())
            if stop:
                stopped = True
                break
            x0, sigma, noise = _global_batch(images, step, cfg, sigma_range)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, t.lr, t.warmup_steps)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                per_sample = dsm_loss_per_sample(net, x0[shard], sigma[shard], noise[shard], model.sigma_data)
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            _ema_update(ema, model, t.ema_decay, step)
            step += 1
            window.append(loss.detach())
            if step % t.log_every == 0 or step == t.steps:
                flush_window()
            bar.update(1)
            if step % t.checkpoint_every == 0 and step < t.steps:
                save(step)
        bar.close()
        if window:
            flush_window()
        if rank == 0:
            save(step)
            _save_loss_curve(out / "loss_curve.png", losses, val_losses)
        if world > 1:
            dist.barrier()
        return TrainResult(ema, step, out, ckpt_path, losses, stopped, val_losses)
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()

