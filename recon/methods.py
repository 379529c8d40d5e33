"""The method table: every reconstruction method by name, classical and prior-based, in one registry.

``adapt.py``, ``reconstruct.py`` and ``evaluate.py`` read this table, so a name means one thing
everywhere:

* classical (no prior): ``zero_filled``, ``sense``, ``l1wavelet``, ``tv`` — functions
  ``(sample, sens_maps, **params) -> Reconstruction`` of :mod:`recon.baselines`, run per slice by
  :func:`run_baseline`; their parameters are the functions' keyword arguments.
* prior-based: the optimizer :class:`recon.biasrecon.BiasRecon` on a batch of slices, with the
  run's :class:`~recon.biasrecon.BiasReconSettings` changed as the table says (``changes``):
  ``biasrecon`` (as configured: γ calibration, λ by SURE), ``biasrecon_nosure`` (fixed λ),
  ``unadapted`` (the prior as trained, fixed λ), ``unadapted_sure`` (the prior as trained, λ by
  SURE), ``finetune`` (every weight of the prior fitted per scan, the full test-time-adaptation
  baseline of Darestani et al. 2022), ``lora`` (rank-4 updates of every convolution, as DDIP /
  Steerable Conditional Diffusion adapt a diffusion prior), ``learned_lam`` (one data-consistency
  weight learned per scan, as SMRD / SCD-scalar; no SURE), ``oracle_gamma`` (BiasRecon's γ fitted to
  the clean reference instead of the held-out k-space: the bound of the parameterisation, needs
  references) and ``prior_dc`` (the prior with near-hard data consistency, λ = 10⁻⁴, along 50 levels
  from σ = 1). The adaptation methods share BiasRecon's loss, θ-steps, sampler, guard and SURE step, so
  they differ only in what they fit. Their parameters are the settings' fields.

Best-λ tuning (:func:`tune_lambda`) picks λ of a classical method on the very slices it is scored on.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from recon.baselines import PARAMETER_CHECKS, Reconstruction, l1_wavelet, sense, total_variation, zero_filled
from recon.biasrecon import BiasReconSettings
from recon.data.sample import Sample
from recon.data.transforms import center_crop
from recon.errors import InputError
from recon.metrics import psnr, ssim

__all__ = [
    "Method",
    "METHODS",
    "CLASSICAL_METHODS",
    "PRIOR_METHODS",
    "TUNABLE_METHODS",
    "DEFAULT_LAMBDA_GRID",
    "parse_lambdas",
    "parse_methods",
    "method_parameters",
    "check_params",
    "prior_settings",
    "run_baseline",
    "reference_stack",
    "LambdaScore",
    "SCORED_AGAINST",
    "slice_psnr",
    "slice_scores",
    "tune_lambda",
]


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: the method's name (output folder ``reconstructions/<name>``).
        kind: ``"classical"`` (a function of one slice) or ``"prior"`` (BiasRecon on a batch).
        run: the classical function ``(sample, sens_maps, **params) -> Reconstruction``.
        changes: the prior method's replacements of the run's :class:`BiasReconSettings`.
    """

    name: str
    kind: str
    run: Callable[..., Reconstruction] | None = None
    changes: Mapping[str, Any] = field(default_factory=dict)


FINETUNE_LR = 1e-5
"""Adam's step for every weight of the prior (``finetune``), measured with the knee prior on ``source_brain``
slices 6–7 (outside the matrix's test slices), PSNR gain over the unadapted prior at the fixed λ, mean of 2:
10⁻⁵ +1.23 dB, 3·10⁻⁵ +0.93, 10⁻⁴ and 3·10⁻⁴ 0 (the guard rejected them). γ's step (5·10⁻²) would wreck it."""
LORA_LR = 1e-4
"""Adam's step for the LoRA factors (``lora``), measured as :data:`FINETUNE_LR`: 10⁻⁴ +0.82 dB, 3·10⁻⁴ +0.71,
10⁻³ +0.53, 3·10⁻³ 0 (rejected)."""


def _table(*rows: Method) -> Mapping[str, Method]:
    return MappingProxyType({row.name: row for row in rows})


METHODS: Mapping[str, Method] = _table(
    Method("zero_filled", "classical", run=zero_filled),
    Method("sense", "classical", run=sense),
    Method("l1wavelet", "classical", run=l1_wavelet),
    Method("tv", "classical", run=total_variation),
    Method("biasrecon", "prior"),
    Method("biasrecon_nosure", "prior", changes={"sure": False}),
    Method("unadapted", "prior", changes={"adapt": "none", "sure": False}),
    Method("unadapted_sure", "prior", changes={"adapt": "none", "sure": True}),
    Method("finetune", "prior", changes={"adapt": "full", "lr": FINETUNE_LR}),
    Method("lora", "prior", changes={"adapt": "lora", "lr": LORA_LR}),
    Method("learned_lam", "prior", changes={"adapt": "lam", "sure": False}),
    Method("oracle_gamma", "prior", changes={"adapt": "gamma", "calib_loss": "reference"}),
    Method("prior_dc", "prior", changes={"adapt": "none", "sure": False, "lam": 1e-4, "num_steps": 50,
                                         "sigma_start": 1.0, "sigma_end": 0.01}),
)
"""Registry ``name → Method`` (read-only)."""

CLASSICAL_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "classical")
"""The methods that need no prior (what ``reconstruct.py --method all`` runs)."""

PRIOR_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "prior")
"""The methods that run the prior through :class:`recon.biasrecon.BiasRecon`."""

TUNABLE_METHODS: tuple[str, ...] = ("l1wavelet", "tv")
"""Methods whose ``lam`` :func:`tune_lambda` searches."""

DEFAULT_LAMBDA_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
"""λ grid for the tunable methods, on the normalised scale (P99 of the low-resolution image = 1)."""


def _known(method: str, where: str = "method: key 'method'") -> Method:
    if method not in METHODS:
        raise InputError(f"{where} is {method!r}, expected one of {', '.join(METHODS)}.")
    return METHODS[method]


def parse_methods(text: str, where: str = "command line: key '--method'") -> list[str]:
    """``all`` → the classical methods; ``all+prior`` → every method; else a comma list of names, in
    order, duplicates dropped.

    Raises:
        InputError: an empty list or an unknown name, naming ``where``.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(CLASSICAL_METHODS)
    if names == ["all+prior"]:
        return list(METHODS)
    if not names:
        raise InputError(f"{where} is empty, expected a method, a comma list or 'all'.")
    for name in names:
        if name not in METHODS:
            raise InputError(f"{where} names {name!r}, expected 'all' or one of {', '.join(METHODS)}.")
    return list(dict.fromkeys(names))


def parse_lambdas(text: str, where: str, positive: bool = False) -> list[float]:
    """A comma list of λ (empty items skipped): finite and non-negative, or positive with ``positive``.

    Raises:
        InputError: an empty list, a non-number, or a value out of range, naming ``where``.
    """
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        grid = []
    if not grid or not all(math.isfinite(g) and (g > 0 if positive else g >= 0) for g in grid):
        kind = "positive" if positive else "non-negative"
        raise InputError(f"{where} is {text!r}, expected a comma list of {kind} numbers.")
    return grid


def method_parameters(method: str) -> tuple[str, ...]:
    """Names of a method's parameters: a classical function's keyword arguments after
    ``sample, sens_maps``, or the :class:`BiasReconSettings` fields of a prior method.

    Raises:
        InputError: unknown method.
    """
    row = _known(method)
    if row.kind == "prior":
        return tuple(f.name for f in dataclasses.fields(BiasReconSettings))
    return tuple(list(inspect.signature(row.run).parameters)[2:])


def check_params(method: str, params: dict[str, Any]) -> None:
    """Check a method's parameters before any data are read: known names, valid values.

    Values of the classical methods' common parameters (``lam``, ``max_iter``, ``step``, ``tol``,
    ``seed``) are checked here (a method checks any others itself when called); a prior method's
    by :class:`BiasReconSettings`.

    Raises:
        InputError: unknown method or parameter name, or an invalid value.
    """
    allowed = method_parameters(method)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(
            f"{method}: parameter key '{unknown[0]}' is unknown, expected one of {', '.join(allowed) or '(none)'}."
        )
    if METHODS[method].kind == "prior":
        prior_settings(BiasReconSettings(), method, params)
        return
    for name, value in params.items():
        if name in PARAMETER_CHECKS:
            PARAMETER_CHECKS[name](value, method)


def prior_settings(base: BiasReconSettings, method: str, params: Mapping[str, Any] | None = None) -> BiasReconSettings:
    """The settings a prior method runs with: ``base``, the table's changes, then ``params``.

    Raises:
        InputError: not a prior method, or invalid settings (checked by :class:`BiasReconSettings`).
    """
    row = _known(method)
    if row.kind != "prior":
        raise InputError(f"method: key 'method' is {method!r}, expected a prior method ({', '.join(PRIOR_METHODS)}).")
    values = {**row.changes, **dict(params or {})}
    try:
        return dataclasses.replace(base, **values)
    except TypeError as exc:  # a value of the wrong type inside the settings' own checks
        raise InputError(f"{method}: settings {values} are invalid ({exc}).") from None


def reference_stack(samples: Sequence[Sample]) -> torch.Tensor:
    """The slices' clean references stacked for the oracle (``calib_loss="reference"``).

    Shape: each ``sample.reference`` ``(h, w)`` (all alike); returns ``(B, 1, h, w)`` float32.

    Raises:
        InputError: a slice without a reference, or references of different sizes, naming the file.
    """
    refs = []
    for sample in samples:
        if sample.reference is None:
            raise InputError(f"{sample.fname} (slice {sample.slice_idx}): key 'reconstruction_clean' is missing, "
                             f"expected a clean reference for the oracle method (calib_loss='reference').")
        if refs and tuple(sample.reference.shape) != tuple(refs[0].shape):
            raise InputError(f"{sample.fname} (slice {sample.slice_idx}): key 'reconstruction_clean' has shape "
                             f"{tuple(sample.reference.shape)}, expected {tuple(refs[0].shape)} like the batch's first.")
        refs.append(torch.as_tensor(sample.reference, dtype=torch.float32))
    return torch.stack(refs)[:, None]


def _check_maps(sample: Sample, sens_maps: object) -> torch.Tensor:
    source = f"{sample.fname} (slice {sample.slice_idx})"
    shape = tuple(sample.kspace.shape)
    if not isinstance(sens_maps, torch.Tensor) or not torch.is_complex(sens_maps) or tuple(sens_maps.shape) != shape:
        got = f"{sens_maps.dtype} of shape {tuple(sens_maps.shape)}" if isinstance(sens_maps, torch.Tensor) \
            else type(sens_maps).__name__
        raise InputError(f"{source}: key 'sens_maps' must be a complex tensor of the k-space shape {shape}, got {got}.")
    if not bool(torch.isfinite(torch.view_as_real(sens_maps.to(torch.complex64))).all()):
        raise InputError(f"{source}: key 'sens_maps' contains NaN or Inf values, expected finite sensitivity maps.")
    return sens_maps.to(torch.complex64)


def run_baseline(method: str, sample: Sample, sens_maps: torch.Tensor, **params: Any) -> Reconstruction:
    """Reconstruct one slice with a registered method.

    Maths: see the module docstring and each method.

    Shape: ``sample.kspace`` ``(C, H, W)``; ``sens_maps`` ``(C, H, W)`` complex; returns an image
    ``(H, W)`` complex64 on the normalised scale.

    Args:
        method: A key of :data:`METHODS`.
        sample: The measured slice.
        sens_maps: Coil sensitivities (:func:`recon.coils.sensitivity_maps`).
        **params: The method's parameters (``lam``, ``max_iter``, ...).

    Returns:
        The reconstruction, its timing and the parameters used.

    Raises:
        InputError: unknown method or parameter, maps of the wrong shape, invalid values.
    """
    row = _known(method)
    if row.kind != "classical":
        raise InputError(f"method: key 'method' is {method!r}, expected a classical method "
                         f"({', '.join(CLASSICAL_METHODS)}); prior methods run on batches (recon.runner).")
    if not isinstance(sample, Sample):
        raise InputError(f"{method}: key 'sample' must be a recon.data.Sample, got {type(sample).__name__}.")
    maps = _check_maps(sample, sens_maps)
    check_params(method, params)
    return row.run(sample, maps, **params)



# --------------------------------------------------------------------------------------------
# best-λ tuning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LambdaScore:
    """One grid point of :func:`tune_lambda`.

    Attributes:
        lam: The regularisation weight.
        mean_psnr: Mean PSNR (dB) over the slices.
        psnrs: Per-slice PSNRs, in the order of the samples.
        images: The reconstructions ``(H, W)`` complex, in the order of the samples (scored again
            against another reference without solving again).
    """

    lam: float
    mean_psnr: float
    psnrs: tuple[float, ...]
    images: tuple[torch.Tensor, ...] = ()


SCORED_AGAINST = ("target", "reference")
"""What a reconstruction is scored against: fastMRI's target (RSS of the noisy fully sampled data) or the
clean reference (the image before simulated noise, ``Sample.reference``)."""


def slice_psnr(sample: Sample, image: torch.Tensor, against: str = "target") -> float:
    """PSNR of one reconstructed slice against the sample's target or clean reference (fastMRI definition).

    Maths: ``psnr(t, center_crop(|x|))``; against the target ``maxval`` is the file's volume maximum
    (``Sample.max_value``) when known, otherwise the slice target's maximum; against the reference it
    is the reference's maximum.

    Shape: ``image`` ``(H, W)``; target ``(h, w)``, ``h ≤ H``, ``w ≤ W``.
    """
    if against not in SCORED_AGAINST:
        raise InputError(f"key 'against' is {against!r}, expected one of {', '.join(SCORED_AGAINST)}.")
    target = getattr(sample, against)
    if target is None:
        raise InputError(
            f"{sample.fname} (slice {sample.slice_idx}): key '{against}' is missing, expected a {against} image."
        )
    pred = center_crop(image.abs(), tuple(target.shape))
    target = center_crop(target, tuple(pred.shape))
    maxval = sample.max_value if against == "target" else float(target.max())
    return psnr(target, pred, maxval=maxval)


def slice_scores(sample: Sample, image: torch.Tensor) -> dict[str, tuple[float, float]]:
    """``{against: (PSNR, SSIM)}`` of one slice against its target and, where stored, its clean reference
    (fastMRI's definitions; ``maxval`` the file's volume max for the target, the reference's max for it).

    Shape: ``image`` ``(H, W)`` complex or real; the truths ``(h, w)``, compared on ``center_crop(|image|)``.
    """
    out = {}
    for against in SCORED_AGAINST:
        truth = getattr(sample, against)
        if truth is None:
            continue
        maxval = (float(sample.max_value) if sample.max_value else float(truth.max())) if against == "target" \
            else float(truth.max())
        pred = center_crop(image.abs(), truth.shape[-2:]).numpy()[None].astype(np.float32)
        gt = truth.numpy()[None].astype(np.float32)
        out[against] = (psnr(gt, pred, maxval), ssim(gt, pred, maxval))
    return out


def tune_lambda(method: str, samples: Sequence[Sample], maps: Sequence[torch.Tensor],
                grid: Sequence[float] = DEFAULT_LAMBDA_GRID, against: str = "target",
                **params: Any) -> tuple[float, list[LambdaScore]]:
    """Best λ of a method on a set of slices, chosen against their targets (or clean references).

    Maths: ``λ* = argmax_{λ ∈ grid} mean_s PSNR(t_s, |x_s(λ)|)`` (:func:`slice_psnr`); ties go
    to the first grid point. This is the oracle "best-tuned" baseline: λ is chosen on the very
    slices it is evaluated on.

    Shape: ``samples[i].kspace`` ``(C, H, W)``, ``maps[i]`` of the same shape.

    Args:
        method: A method with a ``lam`` parameter (e.g. ``l1wavelet``, ``tv``).
        samples: Slices with targets.
        maps: Their sensitivity maps, in the same order.
        grid: Candidate λ values (non-negative).
        against: ``"target"`` or ``"reference"`` (:data:`SCORED_AGAINST`).
        **params: Other parameters of the method (e.g. ``max_iter``), the same for every λ.

    Returns:
        ``(λ*, table)``: the best λ and one :class:`LambdaScore` per grid point, in grid order.

    Raises:
        InputError: a method without ``lam``, an empty or invalid grid, no samples, samples
            without targets, or maps not matching the samples.
    """
    _known(method)
    if "lam" not in method_parameters(method):
        raise InputError(f"{method}: key 'lam' is not a parameter of this method, expected a method with a λ to tune.")
    if "lam" in params:
        raise InputError(f"{method}: parameter key 'lam' is set by the grid, expected it only in 'grid'.")
    grid = [float(g) for g in grid]
    if not grid or not all(math.isfinite(g) and g >= 0 for g in grid):
        raise InputError(f"{method}: key 'grid' must be a non-empty list of non-negative numbers, got {grid}.")
    if not samples or len(samples) != len(maps):
        raise InputError(
            f"{method}: keys 'samples' and 'maps' must be non-empty and of equal length, "
            f"got {len(samples)} and {len(maps)}."
        )
    if against not in SCORED_AGAINST:
        raise InputError(f"{method}: key 'against' is {against!r}, expected one of {', '.join(SCORED_AGAINST)}.")
    for sample in samples:
        if getattr(sample, against) is None:
            raise InputError(
                f"{sample.fname} (slice {sample.slice_idx}): key '{against}' is missing, expected {against}s to tune λ."
            )
    table = []
    for lam in grid:
        images = tuple(run_baseline(method, sample, m, lam=lam, **params).image for sample, m in zip(samples, maps))
        scores = tuple(slice_psnr(sample, image, against) for sample, image in zip(samples, images))
        table.append(LambdaScore(lam=lam, mean_psnr=float(np.mean(scores)), psnrs=scores, images=images))
    best = max(range(len(table)), key=lambda i: (table[i].mean_psnr, -i))
    return table[best].lam, table
