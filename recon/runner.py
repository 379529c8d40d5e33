"""One reconstruction run over a site's volumes: the library behind ``scripts/adapt.py`` and ``reconstruct.py``.

A run (:class:`RunSpec`, filled by a script from its command line) reads its slices — ``--data`` (a
fastMRI-format file or folder), a site's fastMRI folder, or a simulated site (simulated once into
``OUT/data`` by rank 0 under torchrun) — groups them into batches of one volume, builds one
operator per batch (:class:`SliceSource`), runs every method of the method table
(:mod:`recon.methods`) on it, and writes each volume as fastMRI submission files
(:mod:`recon.data.transforms`) through the resumable, sharded volume loop of :mod:`recon.jobs`.
Rank 0 then aggregates the volumes' records into ``metrics.json`` and, for a summary run, writes
the figures (:mod:`recon.figures`), ``config.yaml`` and the site profile.

γ has one lifecycle: fitted by BiasRecon (per batch, or once per site in mode ``site``), passed on
as a :class:`recon.adapt.CalibratedPrior`, saved as a site profile (``OUT/profiles/<file>.json``
for each volume's first batch, ``OUT/profile.json`` for the kept one) and read back only through
:func:`recon.adapt.calibrated_prior`, the validated load. Records hold losses and λ, never γ.

recon/ never imports scores/: the script hands over the prior (a loader, :data:`PriorLoader`) and
the sampler (:class:`recon.biasrecon.Sampler`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch
from omegaconf import OmegaConf

from recon.adapt import CalibratedPrior, CalibrationShape, calibrated_prior, save_profile
from recon.atomic import write_bytes, write_text
from recon.biasrecon import BiasRecon, BiasReconResult, BiasReconSettings, Sampler
from recon.coils import ESPIRIT_BLOCK, sensitivity_maps
from recon.config import AdaptConfig, method_settings
from recon.data import FastMRISliceDataset, Sample, load_site, site_dataset
from recon.data.fastmri_io import REFERENCE_KEY
from recon.data.sites import SiteConfig
from recon.data.transforms import center_crop, output_size, submission_slice
from recon.errors import InputError
from recon.figures import comparison_figure, gamma_figure, trajectories_figure
from recon.jobs import Ranks, check_output_folder, init_ranks, is_inside, run_volumes
from recon.methods import METHODS, prior_settings, reference_stack, run_baseline, tune_lambda
from recon.metrics import evaluate
from recon.operators import Sense
from recon.sure import estimate_sigma

__all__ = [
    "LoadedPrior",
    "PriorLoader",
    "RunSpec",
    "site_overrides",
    "open_dataset",
    "plan_batches",
    "Batch",
    "SliceSource",
    "noise_level",
    "SharedGamma",
    "calibrate_site",
    "volume_record",
    "compute_metrics",
    "run",
]

METRIC_KEYS = ("psnr", "ssim", "nmse")


class LoadedPrior(Protocol):
    """A loaded, frozen prior and its identity (``scores.priors.LoadedPrior``)."""

    model: Any  # an nn.Module with denoise(x, sigma)
    path: Path
    sha256: str


PriorLoader = Callable[[torch.device, bool], LoadedPrior]
"""``load(device, gradient_checkpointing) -> LoadedPrior``: how a script hands the prior over."""


@dataclass
class RunSpec:
    """What a run is asked to do (a script fills it from its checked command line).

    Attributes:
        site: the site name or YAML path; site_items: its ``key=value`` overrides.
        config: the adapt config (:class:`recon.config.AdaptConfig`): methods, prior settings, maps,
            batching, device, mode.
        out: the output folder (``None``: ``out/<default_out>/<site>``).
        data: a fastMRI-format file or folder instead of the site's data.
        max_slices: only the first N slices in dataset order.
        profile: a site profile to reuse (if it exists) or to save.
        params: per-method parameters (classical: the function's keywords; prior: settings fields).
        tune: the classical methods whose λ is tuned on the slices themselves; grid: the λ grid.
        summary: write the figures, ``config.yaml`` and ``profile.json``.
        prior / sampler: the prior loader and the sampler (needed by prior methods); prior_reason:
            which prior and why (``--prior``, the site's ``prior`` key, or the default), for the summary.
    """

    site: str
    config: AdaptConfig
    site_items: list[str] = field(default_factory=list)
    out: Path | None = None
    default_out: str = "adapt"
    data: Path | None = None
    max_slices: int | None = None
    profile: Path | None = None
    params: dict[str, dict] = field(default_factory=dict)
    tune: list[str] = field(default_factory=list)
    grid: Sequence[float] = ()
    summary: bool = True
    prior: PriorLoader | None = None
    sampler: Sampler | None = None
    prior_reason: str = ""


# --------------------------------------------------------------------------------------------
# data: the site, the slices under ranks, batches and operators
# --------------------------------------------------------------------------------------------


def site_overrides(data: Path | None, overrides: Sequence[str]) -> list[str]:
    """The site dotlist; with ``--data``, ``data.root`` points at it first (so a fastMRI site needs no root).

    Raises:
        InputError: ``--data`` does not exist.
    """
    if data is None:
        return list(overrides)
    if not data.exists():
        raise InputError(f"{data}: key '--data' does not exist, expected a fastMRI h5 file or folder.")
    folder = str((data if data.is_dir() else data.parent).resolve()).replace("'", "''")
    return [f"data.root='{folder}'", *overrides]


def open_dataset(data: Path | None, site: SiteConfig, out: Path, ranks: Ranks, seed: int) -> FastMRISliceDataset:
    """``data`` with the site's mask for fully sampled files, the site's fastMRI folder, or its
    simulated folder (simulated on first use into ``out/data``, a cache of inputs; under torchrun
    rank 0 simulates while the others wait)."""
    acq = site.acquisition
    if data is not None:
        return FastMRISliceDataset(data, mask_type=acq.mask_type, acceleration=acq.acceleration,
                                   center_fraction=acq.center_fraction, mask_seed=acq.mask_seed)
    if site.data.source == "fastmri":
        return site_dataset(site)
    if ranks.is_main:
        dataset = site_dataset(site, workdir=out / "data", seed=seed)
    ranks.barrier()
    if not ranks.is_main:
        dataset = site_dataset(site, workdir=out / "data", seed=seed)
    return dataset


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
    """Slices reconstructed together: Samples, their maps, the operator and the measured k-space.

    Shape: ``maps[i]`` ``(C, H, W)`` on the CPU; ``op`` on ``(B, C, H, W)`` with mask ``(B, 1, H, W)``;
    ``kspace`` ``(B, C, H, W)``.
    """

    items: list[int]
    samples: list[Sample]
    maps: list[torch.Tensor]
    op: Sense
    kspace: torch.Tensor
    map_seconds: float


class SliceSource:
    """Reads slices and their sensitivity maps (once per slice); keeps the ones asked to be kept."""

    def __init__(self, dataset: FastMRISliceDataset, true_maps: bool, device: torch.device,
                 block: str = ESPIRIT_BLOCK) -> None:
        self.dataset, self.true_maps, self.device, self.block = dataset, true_maps, device, block
        self.cache: dict[int, tuple[Sample, torch.Tensor, float]] = {}
        self.keep: set[int] = set()

    def slice(self, i: int) -> tuple[Sample, torch.Tensor, float]:
        """``(sample, maps, seconds spent on the maps)`` of dataset item ``i``."""
        if i in self.cache:
            return self.cache[i]
        sample = self.dataset[i]
        start = time.perf_counter()
        maps = sensitivity_maps(sample, oracle=self.true_maps, block=self.block)
        entry = (sample, maps, time.perf_counter() - start)
        if i in self.keep:
            self.cache[i] = entry
        return entry

    def batch(self, items: Sequence[int]) -> Batch:
        """The slices ``items`` (one volume) as one operator and k-space on the run's device."""
        entries = [self.slice(i) for i in items]
        samples, maps = [e[0] for e in entries], [e[1] for e in entries]
        kspace = torch.stack([s.kspace for s in samples]).to(self.device)
        mask = torch.stack([s.mask for s in samples])[:, None].to(self.device)
        # one slice keeps its maps' own memory layout (ESPIRiT's is not C-contiguous), as a single-slice
        # reconstruction always did: the FFTs' rounding depends on it, and outputs stay bit for bit the same
        stacked = maps[0][None] if len(maps) == 1 else torch.stack(maps)
        return Batch(list(items), samples, maps, Sense(stacked.to(self.device), mask), kspace,
                     sum(e[2] for e in entries))


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


# --------------------------------------------------------------------------------------------
# the prior-side plan: checked before anything is written
# --------------------------------------------------------------------------------------------


@dataclass
class SharedGamma:
    """A γ shared by every slice: calibrated on the site's first slices, or read from a profile."""

    prior: CalibratedPrior
    source: str  # "site" (calibrated in this run) | "profile" (reused)
    site: str
    seconds: float = 0.0
    val_loss_zero: float | None = None
    val_loss_best: float | None = None
    history: list[dict] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """Everything checked before the output folder is created."""

    spec: RunSpec
    site: SiteConfig
    out: Path
    inputs: list[Path]
    ranks: Ranks
    device: torch.device
    settings: dict[str, BiasReconSettings]  # of the prior methods
    gamma_methods: list[str]
    prior: LoadedPrior | None
    shared: SharedGamma | None
    reuse: bool


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "adapt config: key 'device' is 'cuda' but no CUDA device is available, expected 'auto' or 'cpu'."
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _calibration_shape(spec: RunSpec, settings: BiasReconSettings | None = None) -> CalibrationShape:
    """The calibration a method's ``settings`` fit (default: the config's ``biasrecon`` section): its family
    (``calibration_family``), the ``bands`` family's layers and bands, and the schedule's σ range (the per-level
    families' blocks)."""
    settings = method_settings(spec.config, "biasrecon") if settings is None else settings
    return CalibrationShape(settings.calibration_family, spec.config.calibration.layers, spec.config.calibration.bands,
                            sigma_range=(settings.sigma_start, settings.sigma_end), below=settings.calibrate_below)


def _check_profile_path(spec: RunSpec, gamma_methods: list[str], inputs: list[Path]) -> bool:
    """Whether ``--profile`` names a profile to reuse; checks a new one's place."""
    profile = spec.profile
    if profile is None or profile.exists():
        return profile is not None
    if not gamma_methods:
        raise InputError(
            f"{profile}: key '--profile' names a new profile, but no method calibrates γ "
            f"({', '.join(spec.config.methods)}); expected biasrecon among the methods."
        )
    if not profile.parent.is_dir():
        raise InputError(f"{profile}: key '--profile' is in a folder that does not exist, expected an existing one.")
    if any(is_inside(profile, p if p.is_dir() else p.parent) for p in inputs):
        raise InputError(f"{profile}: key '--profile' lies in the input data folder, expected a separate folder.")
    return False


def prepare(spec: RunSpec) -> Plan:
    """Check the site, output folder, methods, prior and a reused profile; write nothing.

    Under torchrun, joins the process group (gloo on CPU, nccl on CUDA: rank ``r`` uses ``cuda:LOCAL_RANK``).

    Raises:
        InputError: the first problem found, as one sentence (a prior loader's own errors pass through).
    """
    config = spec.config
    if spec.max_slices is not None and spec.max_slices < 1:
        raise InputError(f"command line: key '--max-slices' is {spec.max_slices}, expected a positive integer.")
    settings = {}
    for method in config.methods:
        if METHODS[method].kind == "prior":
            base = method_settings(config, "biasrecon")  # the section as configured
            settings[method] = prior_settings(base, method, spec.params.get(method))
    gamma_methods = [m for m, s in settings.items() if s.adapt == "gamma" and s.calib_loss == "heldout"]
    site = load_site(spec.site, site_overrides(spec.data, spec.site_items))
    out = spec.out if spec.out is not None else Path("out") / spec.default_out / site.name
    if spec.data is not None:
        inputs = [spec.data]
    else:
        inputs = [Path(os.path.expanduser(site.data.root))] if site.data.source == "fastmri" else []
    check_output_folder(out, inputs)
    reuse = _check_profile_path(spec, gamma_methods, inputs)
    device = _device(config.device)
    ranks = init_ranks(device)
    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank)
    if spec.tune and ranks.distributed:
        raise InputError(
            "command line: key '--tune' picks λ on every slice in one process, expected a run without torchrun "
            "(tune once, then pass the λ with --param METHOD.lam=VALUE under torchrun)."
        )
    prior, shared = None, None
    if settings:
        if spec.prior is None or spec.sampler is None:
            raise InputError(f"command line: methods {', '.join(settings)} need a prior, expected --prior.")
        prior = spec.prior(device, config.gradient_checkpointing)
        shape = _calibration_shape(spec)
        if reuse:
            value, profile = calibrated_prior(spec.profile, prior.model, prior.sha256, shape)
            shared = SharedGamma(value, "profile", profile.site, extra={**profile.extra, "reused_from": str(spec.profile)})
            if profile.site != site.name and ranks.is_main:
                print(f"note: profile {spec.profile} was calibrated on site {profile.site!r}, used for {site.name!r}",
                      file=sys.stderr)
        elif gamma_methods:
            shape.build(prior.model)  # a bad shape fails now
    return Plan(spec, site, out, inputs, ranks, device, settings, gamma_methods, prior, shared, reuse)


# --------------------------------------------------------------------------------------------
# calibration once per site (mode site)
# --------------------------------------------------------------------------------------------


def calibrate_site(plan: Plan, source: SliceSource, count: int) -> SharedGamma:
    """Fit γ on the first ``calib_slices`` slices of the first slice's matrix size, with BiasRecon's
    calibration steps and its chain-level guard only (no reconstruction)."""
    spec, dataset = plan.spec, source.dataset
    shape = dataset.volumes[dataset.index[0][0]].kspace_shape[1:]
    items = [i for i in range(count) if dataset.volumes[dataset.index[i][0]].kspace_shape[1:] == shape]
    items = items[: spec.config.calib_slices]
    source.keep.update(items)  # their maps are reused by the reconstruction
    batch = source.batch(items)
    settings = replace(plan.settings[plan.gamma_methods[0]], adapt="gamma")
    shape = _calibration_shape(spec, settings)
    start = time.perf_counter()
    optimizer = BiasRecon(plan.prior.model, batch.op, batch.kspace, settings, sampler=spec.sampler,
                          calibration_layers=shape.layers, calibration_bands=shape.bands)
    try:
        optimizer.calibrate(progress=True)  # every calibration step, then the chain-level guard
    finally:
        optimizer.calibration.detach()
    value = CalibratedPrior(plan.prior.model, optimizer.calibration.gamma, shape)
    return SharedGamma(value, "site", plan.site.name, time.perf_counter() - start, optimizer.val_loss_zero,
                       optimizer.val_loss_best, optimizer.history, [f"{s.fname}:{s.slice_idx}" for s in batch.samples])


def _share_site_calibration(plan: Plan, source: SliceSource, count: int) -> SharedGamma:
    """Mode site: rank 0 calibrates γ; every rank gets the same γ (broadcast)."""
    facts = None
    if plan.ranks.is_main:
        fitted = calibrate_site(plan, source, count)
        if not plan.ranks.distributed:
            return fitted
        facts = {**dataclasses.asdict(replace(fitted, prior=None)), "gamma": fitted.prior.gamma}
    facts = plan.ranks.broadcast(facts)
    shape = _calibration_shape(plan.spec, plan.settings[plan.gamma_methods[0]])
    gamma = facts.pop("gamma")
    facts.pop("prior")
    return SharedGamma(prior=CalibratedPrior(plan.prior.model, gamma, shape), **facts)


# --------------------------------------------------------------------------------------------
# one volume: every method on its batches
# --------------------------------------------------------------------------------------------


@dataclass
class MethodRecord:
    """One method over one volume's slices.

    Attributes:
        images: ``{item: (h, w) float32}`` raw-scale magnitude at the submission size.
        seconds: wall time of the method over the volume (maps excluded).
        lams / noise_sigmas / misfits: ``(value, slices)`` per batch (prior methods; misfit: the χ² of the
            forward model's least-squares fit, :attr:`recon.biasrecon.BiasReconResult.misfit`); skipped: slices
            whose calibration the misfit gate skipped.
        val_zero / val_best: validation held-out losses per batch (calibrating methods).
        first: the volume's first batch's result (prior methods).
    """

    images: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    lams: list[tuple[float, int]] = field(default_factory=list)
    noise_sigmas: list[tuple[float, int]] = field(default_factory=list)
    misfits: list[tuple[float, int]] = field(default_factory=list)
    skipped: int = 0
    val_zero: list[float] = field(default_factory=list)
    val_best: list[float] = field(default_factory=list)
    first: BiasReconResult | None = None


def _prior_method(plan: Plan, method: str, batch: Batch, sigma: list[float]) -> BiasReconResult:
    """BiasRecon with the method's settings on one batch (a shared γ is passed on as the prior)."""
    settings, prior = plan.settings[method], plan.prior.model
    if settings.sure and settings.noise_sigma is None:
        if not sigma:
            sigma.append(noise_level(batch.kspace, batch.op.mask))
        settings = replace(settings, noise_sigma=sigma[0])
    if settings.adapt == "gamma" and settings.calib_loss == "heldout" and plan.shared is not None:
        settings, prior = replace(settings, adapt="none"), plan.shared.prior
    shape = _calibration_shape(plan.spec, settings)
    reference = reference_stack(batch.samples) if settings.calib_loss == "reference" else None
    return BiasRecon(prior, batch.op, batch.kspace, settings, sampler=plan.spec.sampler,
                     calibration_layers=shape.layers, calibration_bands=shape.bands, reference=reference).run(
        progress=plan.ranks.is_main and sys.stderr.isatty())  # "sample j/K, level k/N" and the time left


def _reconstruct_volume(plan: Plan, source: SliceSource, volume: int,
                        batches: list[list[int]]) -> tuple[dict[str, MethodRecord], dict[int, Sample], float]:
    """Every method on every batch of one volume; returns the records, the samples and the maps' seconds."""
    methods = plan.spec.config.methods
    records = {m: MethodRecord() for m in methods}
    samples: dict[int, Sample] = {}
    map_seconds = 0.0
    info = source.dataset.volumes[volume]
    for number, items in enumerate(batches):
        batch = source.batch(items)
        map_seconds += batch.map_seconds
        samples.update(zip(items, batch.samples))
        size = output_size(info, batch.samples[0])
        sigma: list[float] = []  # σ of this batch, estimated once for every SURE method
        for method in methods:
            record = records[method]
            if METHODS[method].kind == "classical":
                for i, sample, maps in zip(items, batch.samples, batch.maps):
                    rec = run_baseline(method, sample, maps, **plan.spec.params.get(method, {}))
                    record.images[i] = submission_slice(sample, rec.image, size)
                    record.seconds += rec.seconds
                continue
            result = _prior_method(plan, method, batch, sigma)
            record.seconds += result.seconds
            record.lams.append((float(result.lam), len(items)))
            if result.noise_sigma is not None:
                record.noise_sigmas.append((float(result.noise_sigma), len(items)))
            if result.misfit is not None:
                record.misfits.append((float(result.misfit), len(items)))
            if result.calibration_skipped is not None:
                record.skipped += len(items)
            if result.val_loss_zero is not None:
                record.val_zero.append(float(result.val_loss_zero))
                record.val_best.append(float(result.val_loss_best))
            if number == 0:
                record.first = result
            for i, sample, image in zip(items, batch.samples, result.image):
                record.images[i] = submission_slice(sample, image, size)
    return records, samples, map_seconds


def _stored(dataset: FastMRISliceDataset, volume: int, items: Sequence[int], key: str | None) -> np.ndarray | None:
    """The file's stored image ``key`` (raw scale: its target, or the clean reference of simulated files) of the
    reconstructed slices as magnitudes, or ``None`` without ``key``. Shape ``(slices, h, w)``."""
    if key is None:
        return None
    with h5py.File(dataset.volumes[volume].path, "r") as hf:
        return np.abs(np.asarray(hf[key][[dataset.index[i][1] for i in items]]))


def _volume_metrics(target: np.ndarray, pred: np.ndarray, source: str) -> dict[str, float]:
    """fastMRI's volume metrics on the common centre of target and prediction.

    Raises:
        InputError: a target the metrics refuse (e.g. magnitudes whose squares overflow), naming ``source``.
    """
    target = center_crop(torch.from_numpy(target), pred.shape[-2:]).numpy()
    pred = center_crop(torch.from_numpy(pred), target.shape[-2:]).numpy()
    try:
        return {k: float(v) for k, v in evaluate(target, pred).items()}
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


def _history_json(history: list[dict]) -> list[dict]:
    """A calibration trajectory for the record: step, level and losses (γ stays in profiles)."""
    return [{k: float(r[k]) for k in ("step", "sigma", "loss", "val_loss")} for r in history]


def volume_record(records: dict[str, MethodRecord], target: np.ndarray | None, items: Sequence[int],
                  source: str = "target", reference: np.ndarray | None = None,
                  reference_source: str = "reference") -> dict:
    """The JSON facts of one finished volume: per method the volume metrics (fastMRI's, against the
    stored target ``source`` and, for simulated files, against the clean ``reference`` as
    ``metrics_clean``), seconds, λ, σ, validation losses, and the first batch's trajectory (prior methods)."""
    methods = {}
    for method, record in records.items():
        pred = np.stack([record.images[i] for i in items])
        entry: dict[str, Any] = {
            "metrics": None if target is None else _volume_metrics(target, pred, source),
            "metrics_clean": None if reference is None else _volume_metrics(reference, pred, reference_source),
            "seconds": record.seconds, "lams": record.lams, "noise_sigmas": record.noise_sigmas,
            "misfits": record.misfits, "calibration_skipped": record.skipped,
            "val_zero": record.val_zero, "val_best": record.val_best, "first": None,
        }
        first = record.first
        if first is not None:
            entry["first"] = {"lam": float(first.lam), "sure_curve": [list(map(float, p)) for p in first.sure_curve],
                              "history": _history_json(first.history),
                              "val_loss_zero": first.val_loss_zero, "val_loss_best": first.val_loss_best}
        methods[method] = entry
    return {"methods": methods}


def _weighted_mean(pairs: Sequence[Sequence[float]]) -> float:
    return float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))


def compute_metrics(volume_records: Sequence[dict], count: int, shared: SharedGamma | None,
                    gamma_methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method, from the volumes' records (in dataset order): fastMRI's volume metrics averaged
    over volumes (when the files have targets), ``seconds_per_slice``, and for prior methods the mean
    ``lam`` (with SURE also the ``noise_sigma`` and the model ``misfit`` χ²) and the validation losses of γ."""
    metrics: dict[str, dict[str, float]] = {}
    for method in volume_records[0]["methods"]:
        entries = [r["methods"][method] for r in volume_records]
        entry: dict[str, float] = {}
        for against, suffix in (("metrics", ""), ("metrics_clean", "_clean")):  # the target, the clean reference
            per_volume = [e[against] for e in entries if e.get(against) is not None]
            if per_volume:
                entry.update({k + suffix: float(np.mean([vm[k] for vm in per_volume])) for k in METRIC_KEYS})
        seconds = sum(e["seconds"] for e in entries)
        calibrated_once = shared is not None and method in gamma_methods and shared.source == "site"
        if calibrated_once:
            seconds += shared.seconds  # the site calibration, shared over the slices
        entry["seconds_per_slice"] = seconds / count
        lams = [p for e in entries for p in e["lams"]]
        if lams:
            entry["lam"] = _weighted_mean(lams)
        sigmas = [p for e in entries for p in e["noise_sigmas"]]
        if sigmas:
            entry["noise_sigma"] = _weighted_mean(sigmas)
        misfits = [p for e in entries for p in e.get("misfits", [])]
        if misfits:
            entry["misfit"] = _weighted_mean(misfits)
        skipped = sum(e.get("calibration_skipped", 0) for e in entries)
        if skipped:
            entry["calibration_skipped_slices"] = skipped
        val_zero = [v for e in entries for v in e["val_zero"]]
        if val_zero:
            entry["val_loss_zero"] = float(np.mean(val_zero))
            entry["val_loss_best"] = float(np.mean([v for e in entries for v in e["val_best"]]))
        elif calibrated_once and shared.val_loss_zero is not None:
            entry["val_loss_zero"] = float(shared.val_loss_zero)
            entry["val_loss_best"] = float(shared.val_loss_best)
        metrics[method] = entry
    return metrics


# --------------------------------------------------------------------------------------------
# γ: per-volume profiles and the kept one
# --------------------------------------------------------------------------------------------


@dataclass
class KeptGamma:
    """The γ written as the site profile, with its label, metadata and calibration trajectory."""

    prior: CalibratedPrior
    site: str
    label: str
    extra: dict[str, Any]
    history: list[dict]


def _finite(value: float | None) -> float | None:
    """A loss for a profile's JSON metadata: ``None`` for a non-finite one (damaged data)."""
    return value if value is not None and np.isfinite(value) else None


def _volume_profile(out: Path, path: Path) -> Path:
    return out / "profiles" / f"{path.name}.json"


def _save_first_gamma(plan: Plan, records: dict[str, MethodRecord], samples: dict[int, Sample],
                      first_batch: Sequence[int], path: Path) -> None:
    """Mode scan: the volume's first batch's γ of the first calibrating method, as a site profile."""
    method = plan.gamma_methods[0]
    first = records[method].first
    value = CalibratedPrior(plan.prior.model, first.gamma, _calibration_shape(plan.spec, plan.settings[method]))
    extra = {"prior_file": plan.prior.path.name, "mode": "scan", "method": method,
             "calibrated_on": [f"{samples[i].fname}:{samples[i].slice_idx}" for i in first_batch],
             "val_loss_zero": _finite(first.val_loss_zero), "val_loss_best": _finite(first.val_loss_best)}
    (path.parent).mkdir(parents=True, exist_ok=True)
    save_profile(path, value.calibration, plan.site.name, plan.prior.sha256, extra=extra)


def _kept_gamma(plan: Plan, first_record: dict, first_path: Path) -> KeptGamma | None:
    """The shared γ (reused profile or site calibration), else the first volume's profile (mode scan,
    read back through the validated load), else ``None``."""
    if not plan.gamma_methods:
        return None
    shared = plan.shared
    extra: dict[str, Any] = {"prior_file": plan.prior.path.name}
    if shared is not None and shared.source == "profile":
        return KeptGamma(shared.prior, shared.site, f"reused profile of site {shared.site}",
                         {**extra, **shared.extra}, [])
    if shared is not None:
        extra.update(mode="site", calibrated_on=shared.slices, val_loss_zero=_finite(shared.val_loss_zero),
                     val_loss_best=_finite(shared.val_loss_best))
        return KeptGamma(shared.prior, shared.site, f"site calibration on {len(shared.slices)} slices",
                         extra, shared.history)
    path = _volume_profile(plan.out, first_path)
    shape = _calibration_shape(plan.spec, plan.settings[plan.gamma_methods[0]])
    value, profile = calibrated_prior(path, plan.prior.model, plan.prior.sha256, shape)
    method = profile.extra.get("method", plan.gamma_methods[0])
    return KeptGamma(value, profile.site, f"{method}, first batch", {**extra, **profile.extra},
                     first_record["methods"][method]["first"]["history"])


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _tune(plan: Plan, source: SliceSource, count: int) -> dict[str, dict]:
    """Best λ of the tuned methods on the very slices reconstructed (kept in memory)."""
    source.keep.update(range(count))
    entries = [source.slice(i) for i in range(count)]
    samples, maps = [e[0] for e in entries], [e[1] for e in entries]
    tuning = {}
    for m in plan.spec.tune:
        params = plan.spec.params.setdefault(m, {})
        best, table = tune_lambda(m, samples, maps, plan.spec.grid, **params)
        params["lam"] = best
        tuning[m] = {"lam": best, "grid": [{"lam": row.lam, "mean_psnr": row.mean_psnr} for row in table]}
        print(f"{m}: best lam {best:g} (" + ", ".join(f"{r.lam:g}: {r.mean_psnr:.2f} dB" for r in table) + ")")
    return tuning


def _warm_up(device: torch.device) -> None:
    """Build and apply a tiny operator once, so one-off lazy imports inside torch (about 0.5 s on
    the first ``Sense``) are not charged to the first method's ``seconds_per_slice``."""
    op = Sense(torch.ones(1, 1, 2, 2, dtype=torch.complex64, device=device), torch.ones(2, device=device))
    op.A_adjoint(op.A(torch.ones(1, 1, 2, 2, dtype=torch.complex64, device=device)))


def _run_hash(plan: Plan) -> dict:
    """What every volume's outputs depend on besides the volume itself (hashed into its record)."""
    spec, shared = plan.spec, plan.shared
    return {
        "adapt": OmegaConf.to_container(OmegaConf.structured(spec.config)),
        "params": spec.params,
        "site": OmegaConf.to_container(OmegaConf.structured(plan.site)),
        "prior": None if plan.prior is None else plan.prior.sha256,
        "gamma": None if shared is None else shared.prior.gamma.tolist(),
        "data": None if spec.data is None else str(spec.data.resolve()),
    }


def _json_text(payload: dict) -> str:
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _summary_outputs(plan: Plan, dataset: FastMRISliceDataset, first_record: dict, first_batch: list[int],
                     kept: KeptGamma | None) -> list[str]:
    """Figures, config.yaml and the kept γ as site profile(s); returns what was written."""
    spec, out = plan.spec, plan.out
    methods = spec.config.methods
    order = [m for m in ("unadapted", "biasrecon") if m in methods]
    order += [m for m in methods if m not in order]
    images = {}
    for m in order:
        with h5py.File(out / "reconstructions" / m / first_record["file"], "r") as hf:
            images[m] = hf["reconstruction"][0]
    firsts = {m: e["first"] for m, e in first_record["methods"].items() if e["first"] is not None}
    figures = {"comparison.png": comparison_figure(dataset[first_batch[0]], images),
               "trajectories.png": trajectories_figure(kept.history if kept else [], kept.label if kept else "", firsts)}
    if kept is not None:
        figures["gamma.png"] = gamma_figure(kept.prior.calibration, kept.label)
    resolved = OmegaConf.to_yaml(OmegaConf.create({
        "adapt": OmegaConf.structured(spec.config), "site": OmegaConf.structured(plan.site),
        "prior": None if plan.prior is None else {"path": str(plan.prior.path), "sha256": plan.prior.sha256},
        "data": None if spec.data is None else str(spec.data), "max_slices": spec.max_slices,
    }))
    for name, payload in figures.items():
        write_bytes(out / "figures" / name, payload)
    write_text(out / "config.yaml", resolved)
    places = [str(out / "figures"), str(out / "config.yaml")]
    if kept is not None:
        targets = [out / "profile.json"] + ([spec.profile] if spec.profile is not None and not plan.reuse else [])
        for target in targets:
            save_profile(target, kept.prior.calibration, kept.site, plan.prior.sha256, extra=kept.extra)
            places.append(str(target))
    return places


def _print_summary(plan: Plan, metrics: dict[str, dict[str, float]], count: int, files: int, skipped: int,
                   map_seconds: float, kept: KeptGamma | None, places: list[str]) -> None:
    config, ranks = plan.spec.config, plan.ranks
    maps = "true" if config.maps == "true" else f"ESPIRiT ({config.maps_block} block)"
    procs = f" on {ranks.world_size} processes" if ranks.distributed else ""
    computed = count - skipped
    rate = f" ({map_seconds / computed:.2f} s/slice)" if computed else ""
    print(f"site {plan.site.name}: {count} slices of {files} files{procs} on {plan.device}, "
          f"mode {config.mode}, maps {maps}{rate}")
    if plan.prior is not None and plan.spec.prior_reason:
        print(f"  prior: {plan.spec.prior_reason}")
    section = config.biasrecon
    print(f"  preset {config.preset}: {section.num_steps} noise levels, {section.num_samples} posterior "
          f"sample{'s' if section.num_samples != 1 else ''} (docs/results/speed_quality.md)")
    if skipped:
        print(f"  {skipped} slices were already done by an earlier run with the same config (skipped)")
    if kept is not None:
        calibrated = plan.shared is not None and plan.shared.source == "site"
        print(f"  γ: {kept.label}" + (f" ({plan.shared.seconds:.1f} s)" if calibrated else ""))
    clean = any("psnr_clean" in m for m in metrics.values())
    head = f" {'PSNR*':>7s} {'SSIM*':>7s}" if clean else ""
    print(f"  {'method':18s} {'PSNR':>7s} {'SSIM':>7s} {'NMSE':>9s}{head} {'lambda':>8s} {'s/slice':>8s}")
    for method, entry in metrics.items():
        quality = (f"{entry['psnr']:7.2f} {entry['ssim']:7.4f} {entry['nmse']:9.4g}" if "psnr" in entry
                   else f"{'-':>7s} {'-':>7s} {'-':>9s}")
        if clean:
            quality += (f" {entry['psnr_clean']:7.2f} {entry['ssim_clean']:7.4f}" if "psnr_clean" in entry
                        else f" {'-':>7s} {'-':>7s}")
        lam = f"{entry['lam']:8.3g}" if "lam" in entry else f"{'-':>8s}"
        print(f"  {method:18s} {quality} {lam} {entry['seconds_per_slice']:8.2f}")
    if clean:
        print("  PSNR / SSIM: against the files' target (fastMRI: RSS of the measured, noisy data); "
              "PSNR* / SSIM*: against the clean reference (simulated data)")
    for method, entry in metrics.items():
        if entry.get("calibration_skipped_slices"):
            print(f"  {method}: not calibrated on {entry['calibration_skipped_slices']} slices — the coil maps leave "
                  f"chi2 = {entry.get('misfit', float('nan')):.1f} times the noise unexplained "
                  f"(biasrecon.misfit_limit = {plan.settings[method].misfit_limit:g}; docs/configuration.md)")
    if not any("psnr" in m for m in metrics.values()):
        print("  no targets in the data: metrics.json holds run facts only")
    print("wrote " + ", ".join(places))


def run(spec: RunSpec) -> int:
    """Check everything; reconstruct this rank's volumes one by one (writing each volume's outputs,
    then its record); then rank 0 writes metrics (and, for a summary run, figures, config and
    profile) from all records. Returns the exit code (0)."""
    plan = prepare(spec)
    config, ranks, out = spec.config, plan.ranks, plan.out
    dataset = open_dataset(spec.data, plan.site, out, ranks, config.simulation_seed)
    count = len(dataset) if spec.max_slices is None else min(len(dataset), spec.max_slices)
    volumes: dict[int, list[int]] = {}
    for i in range(count):
        volumes.setdefault(dataset.index[i][0], []).append(i)
    for v in volumes:
        info = dataset.volumes[v]
        if config.maps == "true" and not info.has_sens_maps:
            raise InputError(f"{info.path}: key 'sens_maps' is missing, expected true maps for maps=true.")
        if spec.tune and info.target_key is None:
            raise InputError(f"{info.path}: has no target ('reconstruction_rss' / 'reconstruction_esc'), "
                             f"expected targets for --tune.")
    source = SliceSource(dataset, config.maps == "true", plan.device, config.maps_block)
    batches = plan_batches(dataset.index, count, config.batch_size)
    tuning = _tune(plan, source, count) if spec.tune else {}
    if plan.shared is None and config.mode == "site" and plan.gamma_methods:
        plan.shared = _share_site_calibration(plan, source, count)
    scan_profiles = bool(plan.gamma_methods) and plan.shared is None
    order = list(volumes.items())
    _warm_up(plan.device)

    def compute(k: int) -> tuple[dict[str, np.ndarray], dict, list[float]]:
        v, items = order[k]
        info = dataset.volumes[v]
        own = [b for b in batches if b[0] in items]
        records, samples, seconds = _reconstruct_volume(plan, source, v, own)
        images = {method: np.stack([r.images[i] for i in items]) for method, r in records.items()}
        facts = {"items": list(items), "slices": [f"{samples[i].fname}:{samples[i].slice_idx}" for i in items],
                 **volume_record(records, _stored(dataset, v, items, info.target_key), items,
                                 f"{info.path}: key '{info.target_key}'",
                                 _stored(dataset, v, items, REFERENCE_KEY if info.has_reference else None),
                                 f"{info.path}: key '{REFERENCE_KEY}'")}
        if scan_profiles:  # written last of the volume's own files: a refused volume leaves nothing
            _save_first_gamma(plan, records, samples, own[0], _volume_profile(out, info.path))
        return images, facts, [seconds]

    extra = (lambda k: [_volume_profile(out, dataset.volumes[order[k][0]].path)]) if scan_profiles else None
    done = run_volumes(ranks, [(dataset.volumes[v].path, [dataset.index[i][1] for i in items]) for v, items in order],
                       _run_hash(plan), out, config.methods, compute, extra)
    if done is None:
        return 0
    metrics = compute_metrics(done.records, count, plan.shared, plan.gamma_methods)
    write_text(out / "metrics.json", _json_text(metrics))
    places = [f"{out / 'reconstructions'} ({len(volumes) * len(config.methods)} files)", str(out / "metrics.json")]
    if tuning:
        write_text(out / "tuning.json", _json_text(tuning))
        places.append(str(out / "tuning.json"))
    kept = None
    if spec.summary:
        first = done.records[0]
        kept = _kept_gamma(plan, first, dataset.volumes[order[0][0]].path)
        places += _summary_outputs(plan, dataset, first, batches[0], kept)
    _print_summary(plan, metrics, count, len(volumes), done.skipped, sum(done.timings), kept, places)
    return 0
