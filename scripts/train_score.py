"""Train the score-based prior on a site's training images (denoising score matching).

    python scripts/train_score.py --config configs/prior/source_brain.yaml --out runs/prior [train.steps=2000 ...]
    torchrun --nproc_per_node=N scripts/train_score.py --config ... --out ...     # data-parallel (DDP)

Images, already normalised as the prior expects (the one normalisation of recon.data.normalize):

* a site (``data.site``): simulated anatomy (``data.num_slices``, ``data.seed``), or an image-stack
  site's split ``data.split`` (every slice, ``data.copies`` phase draws each) — e.g. the real knees of
  ``stanford_knee`` (``recon.data.sites.training_images``); ``data.val_split`` names the split whose
  denoising loss is logged at each checkpoint;
* ``data.folder``: a folder of fastMRI h5 files, whose targets are the images
  (``recon.data.images.target_images``);
* ``--images FILE.npy``: a complex array ``(N, H, W)`` or ``(N, 1, H, W)`` normalised the same way.

``train.patch_size`` trains on random square crops (a fully convolutional network then reconstructs
whole slices at their own matrix). Writes into ``--out``: ``checkpoint.safetensors`` (EMA weights +
metadata: config, step, data hash and source, training seconds, validation loss, git commit),
``training_state.safetensors`` (resume), sample grids, ``loss.csv``, ``val_loss.csv``,
``loss_curve.png`` and ``config.yaml``. Re-running with the same ``--out`` resumes from the saved step.
``--time-limit SECONDS`` stops training cleanly (and saves) once that much wall time has passed.
Bad input prints ``error: <message>`` and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recon.errors import InputError
from scores.checkpoints import CheckpointError
from scores.config import ConfigError, PriorConfig, load_prior_config
from scores.priors import bundled_priors, resolve_prior
from scores.train import train

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Commit of the repository holding this script ("unknown" outside git), "-dirty" if files changed."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_images_file(path: Path) -> torch.Tensor:
    """Complex64 ``(N, 1, H, W)`` images from a ``.npy`` file (never unpickled)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected a .npy array of complex training images.")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"{path}: cannot be read as a .npy array ({type(exc).__name__}), expected complex images."
        ) from None
    if not np.iscomplexobj(array) or array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[1] != 1):
        raise InputError(
            f"{path}: array of dtype {array.dtype} and shape {array.shape}, expected complex (N, H, W) or (N, 1, H, W)."
        )
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path}: array holds NaN or infinite values, expected finite complex images.")
    images = torch.from_numpy(np.ascontiguousarray(array.astype(np.complex64)))
    return images[:, None] if images.ndim == 3 else images


def training_data(cfg: PriorConfig) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Training images, validation images (or None) and a description of their source.

    Shape: complex64 ``(N, 1, H, W)`` and ``(M, 1, H', W')``.
    """
    from recon.data.images import target_images
    from recon.data.sites import load_site, training_images

    d = cfg.data
    if d.folder is not None:
        images = torch.from_numpy(target_images(d.folder, copies=d.copies, seed=d.seed))[:, None]
        return images, None, f"folder:{d.folder}"
    site = load_site(d.site)
    images = training_images(site, num_slices=d.num_slices, seed=d.seed, split=d.split, copies=d.copies)
    val = None if d.val_split is None else training_images(site, seed=d.seed, split=d.val_split)
    source = f"site:{d.site}" + (f" split {d.split} ({site.anatomy.path})" if site.anatomy.source == "images" else "")
    return images, val, source


def init_checkpoint(cfg: PriorConfig, config_path: Path) -> Path | None:
    """``train.init_from`` as a file: a bundled prior's name or a checkpoint path (:func:`scores.priors.resolve_prior`)."""
    if cfg.train.init_from is None:
        return None
    try:
        return resolve_prior(cfg.train.init_from)
    except CheckpointError:
        raise InputError(f"{config_path}: key 'train.init_from' is {cfg.train.init_from!r}, expected a bundled prior "
                         f"({', '.join(bundled_priors())}) or a checkpoint file.") from None


def write_config(path: Path, cfg: PriorConfig) -> None:
    """The resolved config as YAML, atomically."""
    from omegaconf import OmegaConf

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="prior config YAML (configs/prior/*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed if it holds a state)")
    parser.add_argument(
        "--images", type=Path, default=None, help="train on a .npy of complex images instead of data.site"
    )
    parser.add_argument("--time-limit", type=float, default=None, help="stop cleanly after this many seconds")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.steps=2000")
    args = parser.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick the fastest convolutions
    try:
        cfg = load_prior_config(args.config, args.overrides)
        if args.time_limit is not None and args.time_limit <= 0:
            raise InputError(
                f"command line: key '--time-limit' is {args.time_limit}, expected a positive number of seconds."
            )
        if args.images is not None:
            images, val_images, source = load_images_file(args.images), None, str(args.images)
        else:
            images, val_images, source = training_data(cfg)
        patch = cfg.train.patch_size
        if patch is not None and patch > min(images.shape[-2:]):
            raise InputError(f"{args.config}: key 'train.patch_size' is {patch}, expected at most the training "
                             f"images' smaller side ({tuple(images.shape[-2:])}).")
        remaining = None if args.time_limit is None else args.time_limit - (time.monotonic() - start)
        result = train(
            cfg, images, args.out, metadata={"git_commit": git_commit(), "data_source": source},
            time_limit=remaining, resume=not args.no_resume, progress=not args.no_progress, val_images=val_images,
            init_checkpoint=init_checkpoint(cfg, args.config),
        )
    except (InputError, ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        write_config(args.out / "config.yaml", cfg)
        why = " (time limit)" if result.stopped_by_time_limit else ""
        last = f", last logged loss {result.losses[-1][1]:.4g}" if result.losses else ""
        last += f", validation loss {result.val_losses[-1][1]:.4g}" if result.val_losses else ""
        print(f"trained to step {result.step}{why}{last}; wrote {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
