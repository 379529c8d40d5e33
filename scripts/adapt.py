"""Adapt a score-based prior to a site's scans at test time (BiasRecon) and reconstruct them.

Usage::

    python scripts/adapt.py --site unseen_center
        [--data PATH] [--prior PATH] [--profile PATH] [--max-slices N] [--out DIR]
        [--config YAML] [key=value ...]

Data: ``--data PATH`` (a fastMRI-format h5 file or folder: multi- or single-coil, fully or
prospectively undersampled, any matrix size and raw scale) if given — the site then supplies
only the method settings, and its mask (``acquisition``) is applied to fully sampled files only.
Otherwise the site's own data: a fastMRI site reads ``data.root``; a simulated site is simulated
(once, cached) into ``DIR/data/<site>-seed<S>`` (``S = simulation_seed``). ``--max-slices N``
keeps the first N slices in dataset order (files sorted by name, slices in order).

Configuration: ``configs/biasrecon/default.yaml`` (or ``--config``) on the :class:`AdaptConfig`
schema, then ``key=value`` overrides: keys starting with ``site.`` go, without the prefix, to the
site (``site.acquisition.acceleration=8``); every other key to the adapt config
(``biasrecon.num_steps=20``, ``calibration.bands=4``, ``mode=site``). Unknown keys are errors.

Methods (``methods``): ``biasrecon`` (the ``biasrecon`` section as configured: γ calibration,
λ by SURE), ``biasrecon_nosure`` (the same with the fixed λ), ``unadapted`` (the prior as trained,
fixed λ), ``unadapted_sure`` (the prior as trained, λ by SURE), ``finetune`` (every weight of the
prior fitted per scan, the full test-time-adaptation baseline).

Modes: ``scan`` calibrates γ on each batch of slices (slices of one file, up to ``batch_size``);
``site`` calibrates γ once on the first ``calib_slices`` slices (those of the first slice's
matrix size) and then reconstructs every slice with that γ fixed. ``--profile PATH``: when the
file exists, its γ is reused for every slice (no calibration, in either mode; it must belong to
the prior); otherwise the calibration is saved there (mode site: the site calibration; mode scan:
the first batch's γ). ``DIR/profile.json`` holds the same γ (the reused one, the site calibration,
or the first batch's); it is not written when no method calibrates γ.

Volumes are the unit of work. Under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA)
rank ``r`` takes the volumes ``v`` with ``v % N == r`` (dataset order; mode site: rank 0 calibrates
and broadcasts γ), and the union of the outputs equals a single-process run. Each volume's
reconstructions are written (atomically) as soon as its slices are done, then its record
``DIR/records/<file>.json`` (config hash and facts); a rerun skips volumes whose record carries the
same config hash (settings, site, prior, the shared γ, the input file's size and mtime, its
slices) and redoes the others. SIGTERM / SIGINT stop the run with exit code 128 + signal, leaving
no partial file; the same command then completes the set. Rank 0 writes the summary outputs from
every volume's record:

Outputs (each file atomically; never into the input folder):

* ``DIR/reconstructions/METHOD/<input file name>.h5``: dataset ``reconstruction``
  ``(slices, h, w)`` float32 magnitude on the file's raw scale, at the k-space matrix, or
  centre-cropped to the target's size when the file has a target (fastMRI's submission format).
* ``DIR/metrics.json``: ``{method: {"psnr", "ssim", "nmse", "seconds_per_slice", "lam", ...}}`` —
  fastMRI's volume-wise metrics averaged over volumes (only when the files have targets), the
  mean wall time per slice (sensitivity maps excluded; in mode site the calibration time is
  shared over the slices), the mean λ used, and for calibrating methods the validation held-out
  loss at γ = 0 and at the kept γ (``val_loss_zero``, ``val_loss_best``).
* ``DIR/figures/comparison.png`` (first slice: target, unadapted, BiasRecon and |error| maps),
  ``DIR/figures/trajectories.png`` (held-out loss per calibration step; SURE curve λ vs SURE),
  ``DIR/figures/gamma.png`` (the kept γ, layers × bands).
* ``DIR/profile.json`` (see above) and ``DIR/config.yaml`` (the resolved adapt and site config).

Bad input: ``error: <message>`` on stderr, exit code 2 (arguments, configs, the site, the data
files' structure and the prior are checked before the output folder is created; a bad value found
while reading a slice, such as NaN k-space, stops the run before that volume is written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, List, Optional

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import scores  # noqa: E402
from recon.adapt import FrequencyCalibration, apply_profile, save_profile  # noqa: E402
from recon.atomic import write_bytes  # noqa: E402
from recon.baselines import center_crop, sensitivity_maps  # noqa: E402
from recon.biasrecon import BiasRecon, BiasReconResult, BiasReconSettings  # noqa: E402
from recon.data import FastMRISliceDataset, Sample, load_site, site_dataset  # noqa: E402
from recon.data.sites import SiteConfig  # noqa: E402
from recon.errors import InputError  # noqa: E402
from recon.jobs import (  # noqa: E402
    Interrupted,
    OneLineParser,
    Ranks,
    check_output_folder,
    file_sha256,
    init_ranks,
    interruptible,
    is_inside,
    run_volumes,
)
from recon.metrics import evaluate, psnr  # noqa: E402
from recon.operators import Sense  # noqa: E402
from recon.sure import estimate_sigma  # noqa: E402
from scores.checkpoints import CheckpointError, load_checkpoint  # noqa: E402
from scores.config import ConfigError  # noqa: E402

__all__ = [
    "BiasReconSection",
    "CalibrationSection",
    "AdaptConfig",
    "METHODS",
    "DEFAULT_CONFIG",
    "DEFAULT_PRIOR",
    "load_config",
    "split_overrides",
    "method_settings",
    "noise_level",
    "plan_batches",
    "load_prior",
    "calibrate_site",
    "reconstruct",
    "compute_metrics",
    "run",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "biasrecon" / "default.yaml"
DEFAULT_PRIOR = Path(scores.__file__).resolve().parent / "weights" / "source_brain.safetensors"
METRIC_KEYS = ("psnr", "ssim", "nmse")

METHODS: dict[str, dict[str, Any]] = {
    "biasrecon": {},
    "biasrecon_nosure": {"sure": False},
    "unadapted": {"adapt": "none", "sure": False},
    "unadapted_sure": {"adapt": "none", "sure": True},
    "finetune": {"adapt": "full"},
}
"""Each method is the ``biasrecon`` section with these settings replaced."""


# --------------------------------------------------------------------------------------------
# configuration schema
# --------------------------------------------------------------------------------------------


@dataclass
class BiasReconSection:
    """The optimizer's settings (mirrors :class:`recon.biasrecon.BiasReconSettings`)."""

    num_steps: int = 8
    sigma_start: float = 0.5
    sigma_end: float = 0.01
    eta: float = 1.0
    adapt: str = "gamma"
    theta_steps: int = 4
    adapt_fraction: float = 0.7
    lr: float = 5e-2
    split_ratio: float = 0.4
    acs_fraction: float = 0.08
    lam: float = 0.01
    sure: bool = True
    lam_grid: List[float] = field(default_factory=lambda: [0.001, 0.01, 0.1])
    noise_sigma: Optional[float] = None
    sure_epsilon: float = 0.1
    cg_iters: int = 10
    seed: int = 0
    calib_iterate: str = "theta"
    acs_auto: bool = True


@dataclass
class CalibrationSection:
    """Shape of the frequency calibration: ``layers`` layers × ``bands`` radial bands (< 100 values)."""

    layers: int = 24
    bands: int = 3


@dataclass
class AdaptConfig:
    """Schema of ``configs/biasrecon/*.yaml`` (the YAML holds the defaults)."""

    biasrecon: BiasReconSection = field(default_factory=BiasReconSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    maps: str = "espirit"  # "espirit" | "true"
    batch_size: int = 4
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    methods: List[str] = field(default_factory=lambda: ["biasrecon", "unadapted"])
    mode: str = "scan"  # "scan" | "site"
    calib_slices: int = 4
    simulation_seed: int = 0
    gradient_checkpointing: bool = False  # recompute the score network's blocks in backward (less memory)


def _omegaconf_message(exc: Exception, key: str | None = None) -> str:
    """``key '<dotted key>' (<first line of the message>)`` of an omegaconf error."""
    key = getattr(exc, "full_key", None) or key or "?"
    msg = str(getattr(exc, "msg", None) or exc).strip().splitlines()
    return f"key '{key}' ({msg[0].rstrip('.') if msg else type(exc).__name__})"


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` items into adapt-config overrides and site overrides (``site.`` stripped).

    Raises:
        InputError: an item that is not ``key=value``.
    """
    adapt, site = [], []
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"command line: override {item!r} is not key=value, expected e.g. biasrecon.num_steps=20.")
        if key.startswith("site."):
            site.append(item[len("site."):])
        else:
            adapt.append(item)
    return adapt, site


def _checked(cfg: Any, where: str) -> AdaptConfig:
    """The typed config of ``cfg``, its values checked; errors name ``where`` (the file or the command line).

    Raises:
        InputError: an unresolvable interpolation or an invalid value.
    """
    try:
        config: AdaptConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise InputError(f"{where}: {_omegaconf_message(exc)} cannot be resolved, expected a plain value.") from None
    if config.maps not in ("espirit", "true"):
        raise InputError(f"{where}: key 'maps' is {config.maps!r}, expected 'espirit' or 'true'.")
    if config.device not in ("auto", "cpu", "cuda"):
        raise InputError(f"{where}: key 'device' is {config.device!r}, expected 'auto', 'cpu' or 'cuda'.")
    if config.mode not in ("scan", "site"):
        raise InputError(f"{where}: key 'mode' is {config.mode!r}, expected 'scan' or 'site'.")
    if config.batch_size < 1 or config.calib_slices < 1:
        raise InputError(
            f"{where}: keys 'batch_size' and 'calib_slices' are {config.batch_size} and {config.calib_slices}, "
            f"expected positive integers."
        )
    if not config.methods or any(m not in METHODS for m in config.methods):
        raise InputError(
            f"{where}: key 'methods' is {list(config.methods)}, expected a non-empty list of {', '.join(METHODS)}."
        )
    layers, bands = config.calibration.layers, config.calibration.bands
    if layers < 1 or bands < 1:
        raise InputError(
            f"{where}: keys 'calibration.layers' and 'calibration.bands' are {layers} and {bands}, "
            f"expected positive integers."
        )
    for method in config.methods:
        try:
            method_settings(config, method)
        except InputError as exc:
            raise InputError(f"{where}: {str(exc).rstrip('.')}.") from None
    config.methods = list(dict.fromkeys(config.methods))
    return config


def load_config(path: Path, overrides: Sequence[str]) -> AdaptConfig:
    """Read the adapt config: schema ← YAML ← dotlist; validate the values the library does not.

    The YAML is checked on its own first (errors name the file), then with the overrides (errors
    name the command line).

    Raises:
        InputError: unreadable YAML, unknown keys or wrong types (naming the file or the override),
            or invalid values.
    """
    if not path.is_file():
        raise InputError(f"{path}: key '--config' is not a file, expected an adapt config YAML (configs/biasrecon/).")
    schema = OmegaConf.structured(AdaptConfig)
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise InputError(
            f"{path}: cannot be parsed as YAML ({type(exc).__name__}), expected an adapt config."
        ) from None
    if not isinstance(loaded, DictConfig):
        raise InputError(f"{path}: holds a YAML list, expected a mapping of adapt config keys.")
    top = next(iter(loaded.keys()), None) if len(loaded) == 1 else None
    try:
        cfg = OmegaConf.merge(schema, loaded)
    except OmegaConfBaseException as exc:
        raise InputError(
            f"{path}: {_omegaconf_message(exc, top)} is not in the adapt config schema or has the wrong type."
        ) from None
    _checked(cfg, str(path))
    for item in overrides:
        key = item.partition("=")[0]
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception as exc:  # omegaconf and yaml errors
            detail = _omegaconf_message(exc, key) if isinstance(exc, OmegaConfBaseException) else type(exc).__name__
            raise InputError(
                f"command line: override {item!r} is unknown or has the wrong type ({detail}), expected a key of "
                f"{path.name} like biasrecon.num_steps=20 or a site key like site.acquisition.acceleration=8."
            ) from None
    return _checked(cfg, f"command line ({path} with overrides)")


def method_settings(config: AdaptConfig, method: str) -> BiasReconSettings:
    """The typed library settings of one method: the ``biasrecon`` section with the method's changes.

    Raises:
        InputError: invalid settings (checked by :class:`BiasReconSettings`).
    """
    b = config.biasrecon
    settings = BiasReconSettings(
        num_steps=int(b.num_steps), sigma_start=float(b.sigma_start), sigma_end=float(b.sigma_end),
        eta=float(b.eta), adapt=b.adapt, theta_steps=int(b.theta_steps), adapt_fraction=float(b.adapt_fraction),
        lr=float(b.lr), split_ratio=float(b.split_ratio), acs_fraction=float(b.acs_fraction), lam=float(b.lam),
        sure=bool(b.sure), lam_grid=tuple(float(v) for v in b.lam_grid),
        noise_sigma=None if b.noise_sigma is None else float(b.noise_sigma),
        sure_epsilon=float(b.sure_epsilon), cg_iters=int(b.cg_iters), seed=int(b.seed),
        calib_iterate=b.calib_iterate, acs_auto=bool(b.acs_auto),
    )
    return replace(settings, **METHODS[method])


# --------------------------------------------------------------------------------------------
# arguments and inputs (all checked before anything is written)
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, help="site name in configs/sites or a .yaml path")
    parser.add_argument("--data", type=Path, help="fastMRI-format h5 file or folder (default: the site's data)")
    parser.add_argument("--prior", type=Path, default=DEFAULT_PRIOR, help="safetensors checkpoint of the prior")
    parser.add_argument("--profile", type=Path, help="site profile to reuse (if it exists) or to save")
    parser.add_argument("--max-slices", type=int, help="reconstruct only the first N slices")
    parser.add_argument("--out", type=Path, help="output folder (default: out/adapt/<site>)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="adapt config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides; site.KEY=VALUE goes to the site")
    return parser.parse_intermixed_args(argv)


def _site_overrides(data: Path | None, overrides: list[str]) -> list[str]:
    """With ``--data``, ``data.root`` points at it first (so a fastMRI site needs no root of its own)."""
    if data is None:
        return overrides
    if not data.exists():
        raise InputError(f"{data}: key '--data' does not exist, expected a fastMRI h5 file or folder.")
    folder = str((data if data.is_dir() else data.parent).resolve()).replace("'", "''")
    return [f"data.root='{folder}'", *overrides]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "adapt config: key 'device' is 'cuda' but no CUDA device is available, expected 'auto' or 'cpu'."
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LoadedPrior:
    """The loaded, frozen prior and its identity (the sha256 of the checkpoint file)."""

    model: torch.nn.Module
    path: Path
    sha256: str
    model_device: torch.device


def load_prior(path: Path, device: torch.device, gradient_checkpointing: bool = False) -> LoadedPrior:
    """Load a safetensors checkpoint (never a pickle) and freeze its weights; optionally recompute
    its blocks in backward (gradient checkpointing: less memory for the calibration, more time).

    Raises:
        CheckpointError: a missing, pickled or mismatching checkpoint.
    """
    model, _ = load_checkpoint(path, device=device)
    model.requires_grad_(False)
    model.set_gradient_checkpointing(gradient_checkpointing)
    return LoadedPrior(model.eval(), path, file_sha256(path), device)


def _calibration(prior: LoadedPrior, config: AdaptConfig) -> FrequencyCalibration:
    return FrequencyCalibration(prior.model, layers="auto", num_layers=config.calibration.layers,
                                bands=config.calibration.bands)


# --------------------------------------------------------------------------------------------
# slices, batches and the reconstruction
# --------------------------------------------------------------------------------------------


def plan_batches(index: Sequence[tuple[int, int]], count: int, batch_size: int) -> list[list[int]]:
    """Group the first ``count`` dataset items into batches of consecutive slices of one volume.

    Shape: ``index`` the dataset's ``(volume, slice)`` pairs; returns lists of item indices,
    each at most ``batch_size`` long and from a single volume (so of one matrix size).
    """
    batches: list[list[int]] = []
    for i in range(count):
        last = batches[-1] if batches else None
        if last is not None and index[last[-1]][0] == index[i][0] and len(last) < batch_size:
            last.append(i)
        else:
            batches.append([i])
    return batches


@dataclass
class Batch:
    """Slices reconstructed together: Samples, maps, the operator and the measured k-space."""

    items: list[int]
    samples: list[Sample]
    op: Sense
    kspace: torch.Tensor
    map_seconds: float


class SliceSource:
    """Reads slices and their sensitivity maps; keeps the ones asked to be kept (calibration slices)."""

    def __init__(self, dataset: FastMRISliceDataset, true_maps: bool, device: torch.device) -> None:
        self.dataset, self.true_maps, self.device = dataset, true_maps, device
        self.cache: dict[int, tuple[Sample, torch.Tensor, float]] = {}
        self.keep: set[int] = set()

    def slice(self, i: int) -> tuple[Sample, torch.Tensor, float]:
        if i in self.cache:
            return self.cache[i]
        sample = self.dataset[i]
        start = time.perf_counter()
        maps = sensitivity_maps(sample, oracle=self.true_maps)
        entry = (sample, maps, time.perf_counter() - start)
        if i in self.keep:
            self.cache[i] = entry
        return entry

    def batch(self, items: Sequence[int]) -> Batch:
        """Shape: ``kspace`` and maps ``(B, C, H, W)``, mask ``(B, 1, H, W)``."""
        entries = [self.slice(i) for i in items]
        samples = [e[0] for e in entries]
        maps = torch.stack([e[1] for e in entries]).to(self.device)
        kspace = torch.stack([s.kspace for s in samples]).to(self.device)
        mask = torch.stack([s.mask for s in samples])[:, None].to(self.device)
        return Batch(list(items), samples, Sense(maps, mask), kspace, sum(e[2] for e in entries))


@dataclass
class SiteCalibration:
    """A γ shared by every slice: calibrated on the site's first slices, or read from a profile."""

    calibration: FrequencyCalibration
    source: str  # "site" (calibrated in this run) | "profile" (reused)
    site: str
    seconds: float = 0.0
    val_loss_zero: float | None = None
    val_loss_best: float | None = None
    history: list[dict] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def calibrate_site(prior: LoadedPrior, config: AdaptConfig, source: SliceSource, count: int,
                   site: str) -> SiteCalibration:
    """Fit γ on the first ``calib_slices`` slices of the first slice's matrix size, with BiasRecon's
    calibration steps only (no reconstruction); γ is the kept one (lowest validation held-out loss)."""
    dataset = source.dataset
    shape = dataset.volumes[dataset.index[0][0]].kspace_shape[1:]
    items = [i for i in range(count) if dataset.volumes[dataset.index[i][0]].kspace_shape[1:] == shape]
    items = items[: config.calib_slices]
    source.keep.update(items)  # their maps are reused by the reconstruction
    batch = source.batch(items)
    calibration = _calibration(prior, config)
    settings = replace(method_settings(config, "biasrecon"), adapt="gamma")
    start = time.perf_counter()
    optimizer = BiasRecon(prior.model, batch.op, batch.kspace, settings, calibration=calibration)
    try:
        optimizer.calibrate(progress=True)  # every calibration step, then the chain-level guard
    finally:
        calibration.detach()
    return SiteCalibration(
        calibration, "site", site, time.perf_counter() - start, optimizer.val_loss_zero, optimizer.val_loss_best,
        optimizer.history, [f"{s.fname}:{s.slice_idx}" for s in batch.samples],
    )


@dataclass
class MethodRecord:
    """One method over one volume's slices: raw-scale magnitude images (cropped) and run facts.

    Attributes:
        images: ``{item: (h, w) float32}``.
        seconds: wall time of the optimizer over the volume's batches.
        lams: ``(λ, slices)`` per batch; noise_sigmas: ``(σ, slices)`` per batch (SURE methods).
        val_zero / val_best: validation held-out losses per batch (calibrating methods).
        first: the volume's first batch's result (figures); its γ is ``first.gamma``.
    """

    images: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    lams: list[tuple[float, int]] = field(default_factory=list)
    noise_sigmas: list[tuple[float, int]] = field(default_factory=list)
    val_zero: list[float] = field(default_factory=list)
    val_best: list[float] = field(default_factory=list)
    first: BiasReconResult | None = None


def _magnitude(sample: Sample, image: torch.Tensor) -> np.ndarray:
    """``|x|`` of one slice on the raw scale, centre-cropped to the target's size. Shape ``(h, w)``."""
    magnitude = image.detach().abs().reshape(image.shape[-2:]).cpu()
    if sample.target is not None:
        magnitude = center_crop(magnitude, tuple(sample.target.shape))
    return np.asarray(sample.denormalize(magnitude).numpy(), dtype=np.float32)


def noise_level(kspace: torch.Tensor, mask: torch.Tensor) -> float:
    """Measurement σ (``E|n|² = σ²``, normalised scale) of a batch: :func:`recon.sure.estimate_sigma`.

    Shape: ``kspace`` ``(B, C, H, W)``, ``mask`` ``(B, 1, H, W)``.

    Raises:
        InputError: too few sampled entries at the k-space periphery, naming the config key to set instead.
    """
    try:
        return estimate_sigma(kspace, mask)
    except InputError:
        raise InputError(
            "adapt config: key 'biasrecon.noise_sigma' is null but the k-space periphery holds too few sampled "
            "entries to estimate it, expected a value such as biasrecon.noise_sigma=0.01 (normalised scale)."
        ) from None


def reconstruct(prior: LoadedPrior, config: AdaptConfig, source: SliceSource, batches: list[list[int]],
                shared: SiteCalibration | None) -> tuple[dict[str, MethodRecord], dict[int, Sample], float]:
    """Run every method on every batch (the batches of one volume).

    Methods that calibrate γ use ``shared`` fixed when it is given (``adapt="none"`` with that
    calibration), otherwise a fresh γ = 0 per batch. Returns ``({method: record}, {item: sample},
    seconds spent on sensitivity maps)``.
    """
    records = {m: MethodRecord() for m in config.methods}
    samples: dict[int, Sample] = {}
    map_seconds = 0.0
    for number, items in enumerate(batches):
        batch = source.batch(items)
        map_seconds += batch.map_seconds
        samples.update(zip(items, batch.samples))
        sigma = None
        for method in config.methods:
            settings, calibration = method_settings(config, method), None
            if settings.sure and settings.noise_sigma is None:
                sigma = noise_level(batch.kspace, batch.op.mask) if sigma is None else sigma
                settings = replace(settings, noise_sigma=sigma)
            if settings.adapt == "gamma":
                if shared is not None:
                    settings, calibration = replace(settings, adapt="none"), shared.calibration
                else:
                    calibration = _calibration(prior, config)
            result = BiasRecon(prior.model, batch.op, batch.kspace, settings, calibration=calibration).run()
            record = records[method]
            record.seconds += result.seconds
            record.lams.append((float(result.lam), len(items)))
            if result.noise_sigma is not None:
                record.noise_sigmas.append((float(result.noise_sigma), len(items)))
            if result.val_loss_zero is not None:
                record.val_zero.append(float(result.val_loss_zero))
                record.val_best.append(float(result.val_loss_best))
            if number == 0:
                record.first = result
            for i, sample, image in zip(items, batch.samples, result.image):
                record.images[i] = _magnitude(sample, image)
    return records, samples, map_seconds


# --------------------------------------------------------------------------------------------
# volumes: the unit of work, of sharding across ranks and of resuming
# --------------------------------------------------------------------------------------------


def _volumes(dataset: FastMRISliceDataset, count: int) -> dict[int, list[int]]:
    """``{volume: [items]}`` of the first ``count`` items, in order."""
    volumes: dict[int, list[int]] = {}
    for i in range(count):
        volumes.setdefault(dataset.index[i][0], []).append(i)
    return volumes


def _stored_target(dataset: FastMRISliceDataset, volume: int, items: Sequence[int]) -> np.ndarray | None:
    """The file's stored target (raw scale) of the reconstructed slices, or ``None``. Shape ``(slices, h, w)``."""
    info = dataset.volumes[volume]
    if info.target_key is None:
        return None
    with h5py.File(info.path, "r") as hf:
        return np.asarray(hf[info.target_key][[dataset.index[i][1] for i in items]])


def _history_json(history: list[dict]) -> list[dict]:
    return [{k: (float(v) if isinstance(v, (float, int)) and not isinstance(v, bool) else v) for k, v in r.items()}
            for r in history]


def volume_record(records: dict[str, MethodRecord], target: np.ndarray | None, items: Sequence[int]) -> dict:
    """The JSON facts of one finished volume: per method the volume metrics (fastMRI's, against the
    stored target), seconds, λ, σ, validation losses, and the first batch's trajectory and γ."""
    methods = {}
    for method, record in records.items():
        first = record.first
        pred = np.stack([record.images[i] for i in items])
        methods[method] = {
            "metrics": None if target is None else {k: float(v) for k, v in evaluate(target, pred).items()},
            "seconds": record.seconds, "lams": record.lams, "noise_sigmas": record.noise_sigmas,
            "val_zero": record.val_zero, "val_best": record.val_best,
            "first": {"lam": float(first.lam), "sure_curve": [list(map(float, p)) for p in first.sure_curve],
                      "history": _history_json(first.history),
                      "val_loss_zero": first.val_loss_zero, "val_loss_best": first.val_loss_best,
                      "gamma": None if first.gamma is None else first.gamma.detach().cpu().tolist()},
        }
    return {"methods": methods}


def _weighted_mean(pairs: Sequence[Sequence[float]]) -> float:
    return float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))


def compute_metrics(volume_records: Sequence[dict], count: int, shared: SiteCalibration | None,
                    gamma_methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method, from the volumes' records (in dataset order): fastMRI's volume metrics averaged
    over volumes (when the files have targets), ``seconds_per_slice``, mean ``lam`` (and the
    ``noise_sigma`` given to SURE), and the validation losses of γ."""
    metrics: dict[str, dict[str, float]] = {}
    for method in volume_records[0]["methods"]:
        entries = [r["methods"][method] for r in volume_records]
        entry: dict[str, float] = {}
        per_volume = [e["metrics"] for e in entries if e["metrics"] is not None]
        if per_volume:
            entry.update({k: float(np.mean([vm[k] for vm in per_volume])) for k in METRIC_KEYS})
        seconds = sum(e["seconds"] for e in entries)
        if shared is not None and method in gamma_methods and shared.source == "site":
            seconds += shared.seconds  # the site calibration, shared over the slices
        entry["seconds_per_slice"] = seconds / count
        entry["lam"] = _weighted_mean([p for e in entries for p in e["lams"]])
        sigmas = [p for e in entries for p in e["noise_sigmas"]]
        if sigmas:
            entry["noise_sigma"] = _weighted_mean(sigmas)
        val_zero = [v for e in entries for v in e["val_zero"]]
        if val_zero:
            entry["val_loss_zero"] = float(np.mean(val_zero))
            entry["val_loss_best"] = float(np.mean([v for e in entries for v in e["val_best"]]))
        elif shared is not None and method in gamma_methods and shared.val_loss_zero is not None:
            entry["val_loss_zero"] = float(shared.val_loss_zero)
            entry["val_loss_best"] = float(shared.val_loss_best)
        metrics[method] = entry
    return metrics


# --------------------------------------------------------------------------------------------
# figures (rendered to PNG bytes first, written with everything else at the end)
# --------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_figure(sample: Sample, images: dict[str, np.ndarray]) -> bytes:
    """First slice: target, each method, and |error| maps under them (PSNR in the titles).

    Shape: ``images`` ``{method: (h, w)}`` raw scale; the target is the Sample's, back on the raw scale.
    """
    plt = _pyplot()
    target = None if sample.target is None else sample.denormalize(sample.target).numpy()
    columns = ([("target", target)] if target is not None else []) + list(images.items())
    rows = 2 if target is not None else 1
    vmax = float(np.percentile(target if target is not None else next(iter(images.values())), 99.5))
    fig, axes = plt.subplots(rows, len(columns), figsize=(3.0 * len(columns), 3.1 * rows), squeeze=False)
    errors = {m: np.abs(im - target) for m, im in images.items()} if target is not None else {}
    emax = max((float(np.percentile(e, 99.5)) for e in errors.values()), default=1.0) or 1.0
    for col, (name, image) in enumerate(columns):
        ax = axes[0, col]
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)
        title = name
        if target is not None and name != "target":
            title += f"\nPSNR {psnr(target, image):.2f} dB"
        ax.set_title(title, fontsize=9)
        if rows == 2:
            if name == "target":
                axes[1, col].axis("off")
            else:
                axes[1, col].imshow(errors[name], cmap="magma", vmin=0, vmax=emax)
                axes[1, col].set_title(f"|error| {name}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{sample.fname} slice {sample.slice_idx}", fontsize=10)
    return _png(fig)


def trajectories_figure(history: list[dict], history_label: str, sure_curves: dict[str, dict]) -> bytes:
    """Held-out k-space loss per calibration step, and the SURE curve λ vs SURE(λ) with the chosen λ.

    ``sure_curves``: ``{method: {"lam": λ, "sure_curve": [(λ, SURE(λ))]}}`` of the first batch.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if history:
        steps = [r["step"] for r in history]
        left.plot(steps, [r["loss"] for r in history], "o-", label="held-out loss (random split)")
        left.plot(steps, [r["val_loss"] for r in history], "s-", label="validation loss of the kept γ")
        left.set_xlabel("calibration step")
        left.xaxis.get_major_locator().set_params(integer=True)
        left.set_ylabel(r"$\|M_\Lambda(FSx) - y_\Lambda\|^2 / \|y_\Lambda\|^2$")
        left.legend(fontsize=8)
        left.set_title(f"calibration ({history_label})", fontsize=10)
    else:
        left.text(0.5, 0.5, "no calibration in this run", ha="center", va="center")
        left.set_axis_off()
    drawn = False
    for name, first in sure_curves.items():
        if first["sure_curve"]:
            lams, values = zip(*first["sure_curve"])
            right.plot(lams, values, "o-", label=f"{name} (λ = {first['lam']:g})")
            right.axvline(first["lam"], color=right.lines[-1].get_color(), ls=":")
            drawn = True
    if drawn:
        right.set_xscale("log")
        right.set_xlabel("λ")
        right.set_ylabel("SURE(λ)")
        right.legend(fontsize=8)
        right.set_title("λ-step (first batch)", fontsize=10)
    else:
        right.text(0.5, 0.5, "no SURE in this run", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    return _png(fig)


def gamma_figure(calibration: FrequencyCalibration, label: str) -> bytes:
    """Heatmap of γ, layers × bands, with the layer names."""
    plt = _pyplot()
    gamma = calibration.gamma.detach().cpu().numpy()
    layers, bands = gamma.shape
    bound = max(float(np.abs(gamma).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * bands, 1.0 + 0.24 * layers))
    shown = ax.imshow(gamma, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    edges = (0.0, *calibration.band_edges, 2**0.5)
    ax.set_xticks(range(bands), [f"band {b}\n{edges[b]:.2f}-{edges[b + 1]:.2f}" for b in range(bands)], fontsize=8)
    ax.set_yticks(range(layers), calibration.layer_names, fontsize=7)
    fig.colorbar(shown, ax=ax, label="γ")
    ax.set_title(f"γ ({label})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _json_bytes(payload: dict) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything checked before the output folder is created."""

    config: AdaptConfig
    gamma_methods: list[str]
    site: SiteConfig
    out: Path
    inputs: list[Path]
    prior: LoadedPrior
    reuse: bool
    shared: SiteCalibration | None
    ranks: Ranks


def prepare(args: argparse.Namespace) -> Plan:
    """Check arguments, configs, site, output folder, prior and a reused profile; write nothing.

    Under torchrun, joins the process group (gloo on CPU, nccl on CUDA: rank ``r`` uses ``cuda:LOCAL_RANK``).

    Raises:
        InputError / CheckpointError: the first problem found, as one sentence.
    """
    adapt_items, site_items = split_overrides(args.overrides)
    config = load_config(args.config, adapt_items)
    gamma_methods = [m for m in config.methods if method_settings(config, m).adapt == "gamma"]
    if args.max_slices is not None and args.max_slices < 1:
        raise InputError(f"command line: key '--max-slices' is {args.max_slices}, expected a positive integer.")
    site = load_site(args.site, _site_overrides(args.data, site_items))
    out: Path = args.out if args.out is not None else Path("out") / "adapt" / site.name
    if args.data is not None:
        inputs = [args.data]
    else:
        inputs = [Path(os.path.expanduser(site.data.root))] if site.data.source == "fastmri" else []
    check_output_folder(out, inputs)
    reuse = args.profile is not None and args.profile.exists()
    if args.profile is not None and not reuse:
        if not gamma_methods:
            raise InputError(
                f"{args.profile}: key '--profile' names a new profile, but no method calibrates γ "
                f"({', '.join(config.methods)}); expected biasrecon among the methods."
            )
        if not args.profile.parent.is_dir():
            raise InputError(
                f"{args.profile}: key '--profile' is in a folder that does not exist, expected an existing one."
            )
        if any(is_inside(args.profile, p if p.is_dir() else p.parent) for p in inputs):
            raise InputError(
                f"{args.profile}: key '--profile' lies in the input data folder, expected a separate folder."
            )
    device = _device(config.device)
    ranks = init_ranks(device)
    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank)
    prior = load_prior(args.prior, device, config.gradient_checkpointing)
    shared = None
    if reuse:
        calibration = _calibration(prior, config)
        profile = apply_profile(args.profile, calibration, prior=prior.sha256)
        shared = SiteCalibration(calibration, "profile", profile.site,
                                 extra={**profile.extra, "reused_from": str(args.profile)})
        if profile.site != site.name and ranks.is_main:
            print(f"note: profile {args.profile} was calibrated on site {profile.site!r}, used for {site.name!r}",
                  file=sys.stderr)
    elif gamma_methods:
        _calibration(prior, config)  # a bad calibration shape fails now
    return Plan(config, gamma_methods, site, out, inputs, prior, reuse, shared, ranks)


def open_dataset(args: argparse.Namespace, plan: Plan) -> FastMRISliceDataset:
    """``--data`` with the site's mask for fully sampled files, the site's fastMRI folder, or its
    simulated folder (simulated on first use into ``DIR/data``, a cache of inputs; under torchrun
    rank 0 simulates while the others wait)."""
    acq, site = plan.site.acquisition, plan.site
    if args.data is not None:
        return FastMRISliceDataset(args.data, mask_type=acq.mask_type, acceleration=acq.acceleration,
                                   center_fraction=acq.center_fraction, mask_seed=acq.mask_seed)
    if site.data.source == "fastmri":
        return site_dataset(site)
    if plan.ranks.is_main:
        dataset = site_dataset(site, workdir=plan.out / "data", seed=plan.config.simulation_seed)
    plan.ranks.barrier()
    if not plan.ranks.is_main:
        dataset = site_dataset(site, workdir=plan.out / "data", seed=plan.config.simulation_seed)
    return dataset


def share_site_calibration(plan: Plan, source: SliceSource, count: int) -> SiteCalibration:
    """Mode site: rank 0 calibrates γ on the first slices; every rank gets the same γ (broadcast)."""
    facts = None
    if plan.ranks.is_main:
        fitted = calibrate_site(plan.prior, plan.config, source, count, plan.site.name)
        facts = {"gamma": fitted.calibration.gamma.detach().cpu(), "seconds": fitted.seconds,
                 "val_loss_zero": fitted.val_loss_zero, "val_loss_best": fitted.val_loss_best,
                 "history": fitted.history, "slices": fitted.slices}
        if not plan.ranks.distributed:
            return fitted
    facts = plan.ranks.broadcast(facts)
    calibration = _calibration(plan.prior, plan.config)
    with torch.no_grad():
        calibration.gamma.copy_(facts.pop("gamma"))
    return SiteCalibration(calibration, "site", plan.site.name, **facts)


def run_hash(args: argparse.Namespace, plan: Plan) -> dict:
    """What every volume's outputs depend on besides the volume itself (hashed into its record)."""
    shared = plan.shared
    return {
        "adapt": OmegaConf.to_container(OmegaConf.structured(plan.config)),
        "site": OmegaConf.to_container(OmegaConf.structured(plan.site)),
        "prior": plan.prior.sha256,
        "gamma": None if shared is None else shared.calibration.gamma.detach().cpu().tolist(),
        "data": None if args.data is None else str(args.data.resolve()),
    }


@dataclass
class KeptGamma:
    """The γ written as the site profile, with its label and metadata."""

    calibration: FrequencyCalibration
    site: str
    label: str
    extra: dict[str, Any]
    history: list[dict]


def kept_gamma(plan: Plan, first_record: dict, first_slices: list[str]) -> KeptGamma | None:
    """The shared γ (reused profile or site calibration), else the first batch's γ of the first
    calibrating method (mode scan), else ``None``."""
    if not plan.gamma_methods:
        return None
    shared = plan.shared
    extra: dict[str, Any] = {"prior_file": plan.prior.path.name}
    if shared is not None and shared.source == "profile":
        return KeptGamma(shared.calibration, shared.site, f"reused profile of site {shared.site}",
                         {**extra, **shared.extra}, [])
    if shared is not None:
        extra.update(mode="site", calibrated_on=shared.slices, val_loss_zero=shared.val_loss_zero,
                     val_loss_best=shared.val_loss_best)
        return KeptGamma(shared.calibration, shared.site, f"site calibration on {len(shared.slices)} slices",
                         extra, shared.history)
    method = plan.gamma_methods[0]
    first = first_record["methods"][method]["first"]
    calibration = _calibration(plan.prior, plan.config)
    with torch.no_grad():
        calibration.gamma.copy_(torch.tensor(first["gamma"]))
    extra.update(mode="scan", calibrated_on=first_slices, val_loss_zero=first["val_loss_zero"],
                 val_loss_best=first["val_loss_best"])
    return KeptGamma(calibration, plan.site.name, f"{method}, first batch", extra, first["history"])


def render_figures(out: Path, methods: Sequence[str], first_record: dict, sample: Sample,
                   kept: KeptGamma | None) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of the comparison (the first slice, read back from the written
    reconstructions), trajectories and γ figures."""
    order = [m for m in ("unadapted", "biasrecon") if m in methods]
    order += [m for m in methods if m not in order]
    images = {}
    for m in order:
        with h5py.File(out / "reconstructions" / m / first_record["file"], "r") as hf:
            images[m] = hf["reconstruction"][0]
    figures = {"comparison.png": comparison_figure(sample, images)}
    figures["trajectories.png"] = trajectories_figure(
        kept.history if kept else [], kept.label if kept else "",
        {m: e["first"] for m, e in first_record["methods"].items()})
    if kept is not None:
        figures["gamma.png"] = gamma_figure(kept.calibration, kept.label)
    return figures


def print_summary(plan: Plan, metrics: dict[str, dict[str, float]], count: int, files: int, skipped: int,
                  map_seconds: float, kept: KeptGamma | None, places: list[str]) -> None:
    config, ranks = plan.config, plan.ranks
    maps = "true" if config.maps == "true" else "ESPIRiT"
    procs = f" on {ranks.world_size} processes" if ranks.distributed else ""
    computed = count - skipped
    rate = f" ({map_seconds / computed:.2f} s/slice)" if computed else ""
    print(f"site {plan.site.name}: {count} slices of {files} files{procs} on {plan.prior.model_device}, "
          f"mode {config.mode}, maps {maps}{rate}")
    if skipped:
        print(f"  {skipped} slices were already done by an earlier run with the same config (skipped)")
    if kept is not None:
        calibrated = plan.shared is not None and plan.shared.source == "site"
        print(f"  γ: {kept.label}" + (f" ({plan.shared.seconds:.1f} s)" if calibrated else ""))
    print(f"  {'method':18s} {'PSNR':>7s} {'SSIM':>7s} {'NMSE':>9s} {'lambda':>8s} {'s/slice':>8s}")
    for method, entry in metrics.items():
        quality = (f"{entry['psnr']:7.2f} {entry['ssim']:7.4f} {entry['nmse']:9.4g}" if "psnr" in entry
                   else f"{'-':>7s} {'-':>7s} {'-':>9s}")
        print(f"  {method:18s} {quality} {entry['lam']:8.3g} {entry['seconds_per_slice']:8.2f}")
    if not any("psnr" in m for m in metrics.values()):
        print("  no targets in the data: metrics.json holds run facts only")
    print("wrote " + ", ".join(places))


def run(args: argparse.Namespace) -> int:
    """Check everything; reconstruct this rank's volumes one by one (writing each volume's outputs,
    then its record); then rank 0 writes metrics, figures, config and profile from all records."""
    plan = prepare(args)
    config, ranks, out = plan.config, plan.ranks, plan.out
    dataset = open_dataset(args, plan)
    count = len(dataset) if args.max_slices is None else min(len(dataset), args.max_slices)
    volumes = _volumes(dataset, count)
    if config.maps == "true":
        for v in volumes:
            if not dataset.volumes[v].has_sens_maps:
                raise InputError(
                    f"{dataset.volumes[v].path}: key 'sens_maps' is missing, expected true maps for maps=true."
                )
    source = SliceSource(dataset, config.maps == "true", plan.prior.model_device)
    batches = plan_batches(dataset.index, count, config.batch_size)
    if plan.shared is None and config.mode == "site" and plan.gamma_methods:
        plan.shared = share_site_calibration(plan, source, count)

    order = list(volumes.items())

    def compute(k: int) -> tuple[dict[str, np.ndarray], dict, list[float]]:
        v, items = order[k]
        results, samples, seconds = reconstruct(plan.prior, config, source, [b for b in batches if b[0] in items],
                                                plan.shared)
        images = {method: np.stack([r.images[i] for i in items]) for method, r in results.items()}
        facts = {"items": list(items), "slices": [f"{samples[i].fname}:{samples[i].slice_idx}" for i in items],
                 **volume_record(results, _stored_target(dataset, v, items), items)}
        return images, facts, [seconds]

    done = run_volumes(ranks, [(dataset.volumes[v].path, [dataset.index[i][1] for i in items]) for v, items in order],
                       run_hash(args, plan), out, config.methods, compute)
    if done is None:
        return 0
    volume_records, skipped, map_seconds = done.records, done.skipped, sum(done.timings)
    metrics = compute_metrics(volume_records, count, plan.shared, plan.gamma_methods)
    first = volume_records[0]
    first_batch = batches[0]
    kept = kept_gamma(plan, first, first["slices"][: len(first_batch)])
    figures = render_figures(out, config.methods, first, dataset[first_batch[0]], kept)
    resolved = OmegaConf.to_yaml(OmegaConf.create({
        "adapt": OmegaConf.structured(config), "site": OmegaConf.structured(plan.site),
        "prior": {"path": str(plan.prior.path), "sha256": plan.prior.sha256},
        "data": None if args.data is None else str(args.data), "max_slices": args.max_slices,
    }))
    write_bytes(out / "metrics.json", _json_bytes(metrics))
    for name, payload in figures.items():
        write_bytes(out / "figures" / name, payload)
    write_bytes(out / "config.yaml", resolved.encode())
    places = [f"{out / 'reconstructions'} ({len(volumes) * len(config.methods)} files)", str(out / "metrics.json"),
              str(out / "figures"), str(out / "config.yaml")]
    if kept is not None:
        save_profile(out / "profile.json", kept.calibration, kept.site, plan.prior.sha256, extra=kept.extra)
        places.append(str(out / "profile.json"))
        if args.profile is not None and not plan.reuse:
            save_profile(args.profile, kept.calibration, kept.site, plan.prior.sha256, extra=kept.extra)
            places.append(str(args.profile))
    print_summary(plan, metrics, count, len(volumes), skipped, map_seconds, kept, places)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one ``error:`` line on bad input; ``128 + signal``
    after SIGTERM / SIGINT, with the finished volumes kept for a rerun to skip)."""
    try:
        with interruptible():
            return run(parse_args(argv))
    except (InputError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as exc:
        print(f"error: configuration: {_omegaconf_message(exc)} is invalid.", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"{exc}: finished volumes are kept; rerun the same command to complete the set.", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
