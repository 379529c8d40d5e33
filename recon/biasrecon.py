"""BiasRecon: the alternating optimizer (calibrate ↔ denoise ↔ SURE) along a diffusion schedule.

Noise levels ``s_0 > … > s_{N−1}`` and the loop come from the :class:`Sampler` the optimizer is given
(``scores.samplers.TweedieSampler``; recon never imports scores, the scripts hand it over). The
iterate starts from the SENSE estimate renoised to ``s_0``; one **x-step** at level ``s_i`` is the
sampler's step with the prox as its data consistency::

    x̂ = D_γ(x, s_i);  x₀ = (AᴴA + λI)⁻¹(Aᴴy + λ x̂);  x ← x₀ + s_{i+1}(√(1−η²) ε + η z)

**Calibration** (``adapt="gamma"``; ``"full"`` is the fine-tune-everything baseline) alternates a
**θ-step** — a few Adam steps on γ minimising the self-supervised held-out loss
``‖M_Λ(F S x̂_γ) − y_Λ‖²/‖y_Λ‖²``, ``x̂_γ = prox_Θ(D_γ(x, s_i))``, a fresh split Θ ∪ Λ each time —
with the x-step, over the first ``adapt_fraction`` of the schedule (``calib_iterate="theta"``: one fixed
split Θc ∪ Λc instead, with the calibration's iterate consistent with ``y_Θc`` only, so that ``y_Λc`` is
really unseen). Guard, in two stages on a
fixed validation split (Θ_v, Λ_v): after each θ-step the candidate γ is scored by one denoising
of a Θ_v-only input (cheap), and the x-step uses the best γ so far; when calibration ends, the
whole x-step chain is run on ``y_Θv`` alone with the kept γ and with γ = 0, and γ = 0 is restored
unless the kept γ predicts ``y_Λv`` better — so adaptation never ends with a held-out loss of the
actual reconstruction above γ = 0's. (The one-denoising score alone is not enough: measured, it
can improve while the chain's output collapses.) The calibration's splits are drawn inside Θ_v, so
``y_Λv`` is never seen before the guard scores it (with it inside the calibration's data, fine-tuning all
3.2 M weights memorised it — the chain's held-out loss fell 0.136 → 0.093 while the image lost 7.6 dB
against the clean reference; knee prior, brain slice, 4×). And calibration runs only where the forward
model explains the data (``misfit_limit`` on the χ² of its least-squares fit): the held-out loss scores the
prior through the coil maps, and where they are wrong it rewards a prior that explains their error.

**λ-step** (``sure=True``): the λ of the final data consistency minimises Monte-Carlo SURE of
``f(y) = A·x₀(y; λ)`` through the whole x-step chain (run at the fixed ``lam``): the divergence by
a seeded probe ``y + εb`` pushed through the chain with common random numbers, scored by
:func:`recon.sure.sure_over_grid` (the estimators the exact-divergence tests check). Two measured
pitfalls it avoids: SURE of a single prox with ``x̂`` held fixed is biased, since ``x̂`` comes from
iterates already made consistent with ``y`` (on ``source_brain`` it chose λ 20–60× too large,
−2 dB); and choosing the chain's own λ by measurement-domain SURE cannot see the null-space
error that λ also shapes (it preferred λ = 0.1 where λ = 0.003 was 1.7 dB better). A third:
SURE weighs the divergence with σ, but when the estimated coil maps cannot explain the data (χ² of
the least-squares fit 3–57 on the brain template and EPI), the measurement-domain risk is dominated by
that misfit, and with the noise σ SURE chose λ ≈ 0.01 and lost up to 1.4 dB against λ = 0.1; σ is
therefore the regression σ of that fit (``sure_sigma="residual"``), which counts the misfit as noise.

recon/ sees the prior only through :class:`Prior` (``denoise(x, sigma)`` on complex
``(B, 1, H, W)``, per-real-channel noise std ``sigma``), so any denoiser module fits, and the
sampler only through :class:`Sampler`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence, get_args

import torch
from torch import nn
from tqdm import tqdm  # plain bars: tqdm.auto asks notebooks for ipywidgets

from recon.adapt.families import FAMILIES, make_calibration
from recon.adapt.lora import LoRA
from recon.adapt.selfsup import KSpaceSplit, density_weights, heldout_loss, split_folds, split_mask, theta_operator
from recon.coils import detect_acs
from recon.data.transforms import center_crop
from recon.dc import prox
from recon.errors import InputError
from recon.operators import Sense, conjugate_gradient
from recon.sure import complex_normal, estimate_sigma, probe, residual_sigma, sampled_count, sure_over_grid

__all__ = ["Prior", "Sampler", "BiasReconSettings", "BiasReconResult", "SureChain", "BiasRecon", "reference_loss"]

AdaptMode = Literal["gamma", "full", "lora", "lam", "none"]
ADAPT_MODES: tuple[str, ...] = get_args(AdaptMode)
CALIB_LOSSES: tuple[str, ...] = ("heldout", "reference")


class Prior(Protocol):
    """A denoiser ``D(x, s) ≈ E[x₀ | x₀ + s(n₁ + i n₂) = x]`` on complex ``(B, 1, H, W)`` images."""

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor: ...


class Sampler(Protocol):
    """The reverse-diffusion loop and its noise levels (``scores.samplers.TweedieSampler``).

    ``levels(start, end, count)``: the decreasing levels ``s_0 = start > … > s_{count−1}``.
    ``sampler(prior, shape, levels, dc=, eta=, generator=, x_start=, copies=, progress=)``: from
    ``x = x_start + s_0 z``, at each level ``x₀ = dc(D(x, s_i), s_i)`` then
    ``x ← x₀ + s_{i+1}(√(1−η²)(x − x₀)/s_i + η z)``, ``z`` complex standard noise from ``generator``
    (``copies`` stacked copies of the batch share each draw); returns the last ``x₀``.
    Shape: ``shape = (B, 1, H, W)``; ``x_start`` and the result complex ``(B, 1, H, W)``.
    """

    def levels(self, start: float, end: float, count: int) -> list[float]: ...

    def __call__(self, prior: Prior, shape: Sequence[int], sigmas: Sequence[float], *,
                 dc: Callable[[torch.Tensor, float], torch.Tensor], eta: float, generator: torch.Generator,
                 x_start: torch.Tensor, copies: int = 1, progress: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class BiasReconSettings:
    """Typed settings of the optimizer: the schema of the ``biasrecon`` section of ``configs/biasrecon``.

    The defaults are the measured ones (``docs/results/quality.md``, ``priors.md``); ``num_steps`` and
    ``num_samples`` are the knee of the speed–quality curve on the real-image val splits
    (``docs/results/speed_quality.md``; the adapt config's ``preset=fast`` is its cheap end).

    Attributes:
        num_steps: noise levels of the sampler; sigma_start / sigma_end: first and last level
            (normalised image scale, 99th percentile ≈ 1); eta: share of fresh noise when renoising.
        num_samples: posterior samples averaged into the estimate (an approximation of the posterior
            mean): the final chain (and SURE's) runs ``num_samples`` times, with seeds ``seed``,
            ``seed + 1``, …, and averages the complex images; 1 is the single sample.
        adapt: what the calibration fits: "gamma" (BiasRecon's band gains), "full" (every weight of the prior:
            test-time training), "lora" (rank-``lora_rank`` updates of every convolution, :class:`recon.adapt.lora.LoRA`),
            "lam" (one learned data-consistency weight λ = exp(ρ), the prior untouched) or "none" (unadapted prior).
            Every mode fits with the same loss, the same θ-steps along the same sampler, and the same guard.
        lora_rank: rank of the LoRA updates (``adapt="lora"``).
        calibration_family: what ``adapt="gamma"`` fits (:mod:`recon.adapt.families`): "norm_affine" (a scale and a
            shift of every normalisation layer's output: 76 variables in the bundled priors), "bands" (radial band
            gains on the network's block outputs, the first version), "conv_gain", "freeu", "residual_bands",
            "sigma_in" or "sigma_residual" — each < 100 variables and exactly the prior at γ = 0. Chosen by the
            oracle bound and the self-supervised result on val slices (``docs/results/calibration_study.md``).
        calib_loss: what the θ-steps minimise: "heldout" (the self-supervised held-out k-space loss) or
            "reference" (the oracle: the error of ``|x|`` against the clean reference image, which the caller
            passes; an upper bound on what the parameterisation can do, never a reconstruction method).
        theta_steps: Adam steps per θ-step; adapt_fraction: share of the schedule with θ-steps;
            lr: Adam's learning rate; split_ratio: share of the sampled non-ACS k-space held out;
            acs_fraction: centre kept in Θ.
        calibrate_below: the calibration acts at noise levels ``σ ≤ calibrate_below`` only (the normalised image
            scale); above it the denoiser is the prior as trained and no θ-step runs (None: every level). The coarse
            content of the image (its low frequencies) forms at the high levels, where the self-supervised loss is
            blind: a 1-D mask often samples no column just outside its fully sampled centre, and there a calibrated
            prior's error grew 20–50 % on the slice it failed (``studies/heldout_blind_spot.py``). Measured on val
            slices (``docs/results/calibration_study.md``), 0.1 against every level: knee prior → Colin 27 +0.44 /
            +0.13 dB (4× / 8×) against +0.09 / −0.20; brain prior → knees +1.17 / +2.03 against +1.37 / +1.34;
            the θ-steps of the levels above it are skipped (25–45 % less time).
        split_sampling: how every held-out set (the calibration's and the guard's) is drawn: "random" (uniformly)
            or "stratified" by the distance from the k-space centre (:func:`recon.adapt.selfsup.split_mask`), so
            that it spans the frequencies the mask samples. Measured on the knee prior → Colin 27 (4×, val): the
            random Λ_v of one slice had no column below |k_x| = 21, while the calibrated prior's error grew at
            |k_x| < 12 (37 % of the never-sampled error). Stratified, the nearest held-out column was |k_x| = 15 (the
            mask samples none nearer), and on val it did not help (−0.05 dB at 4× and 8×): not the default.
        lam: λ of the prox (the fixed λ when ``sure=False``, and during calibration) with ``lam_rule="fixed"``.
        lam_rule: the λ of the chain's data consistency: "fixed" (``lam``) or "noise" — the MAP weight of a
            measurement of noise σ against a prior estimate of error ``prior_error`` per complex pixel,
            ``λ = σ̂² / prior_error²`` (σ̂ = ``noise_sigma`` or estimated from the k-space), so a noisier scan
            trusts the prior more; prior_error: that error on the normalised scale.
        sure: choose the final λ by SURE over ``lam_grid`` (``sure_refine``: a minimum at the grid's edge is
            followed outward, up to 4 points at the edge's spacing, then golden-section search of log λ between
            the neighbours of the minimum); noise_sigma: measurement σ (``E|n|² = σ²``),
            None estimates it from the k-space; sure_epsilon: probe step relative to σ.
        sure_sigma: the σ that SURE weighs its divergence with: "residual" (the regression σ of the data's
            SENSE least-squares fit, :func:`recon.sure.residual_sigma`: noise plus what the forward model —
            the estimated coil maps — cannot explain) or "noise" (``noise_sigma``). Measured
            (``docs/results/lambda_step.md``): where the maps explain the data only to χ² = 3–57 times the
            noise, SURE with the noise σ fits the misfit and chose λ 10× too small (up to −1.4 dB); "residual"
            falls back to "noise" when the data have too few residual degrees of freedom (one coil).
        misfit_limit: calibrate (every ``adapt`` mode with the held-out loss) only where the forward model explains
            the data: where χ² = (regression σ / noise σ)² exceeds it, the calibration is skipped and the prior stays
            as trained (:attr:`BiasReconResult.calibration_skipped` says so). The held-out k-space loss scores the
            prior through the coil maps; where they are wrong it rewards a prior that explains their error
            (measured on the open-world matrix: every slice where BiasRecon lost > 0.1 dB had χ² ≥ 2.9; with the
            simulation's true maps the same slices lost ≤ 0.18 dB or gained). None: always calibrate.
        guard_scales: the final guard's candidates: the calibrated parameters moved a share ``t`` of the way
            from their start (γ = 0, or the prior's weights), ``p = p₀ + t (p_best − p₀)`` for each ``t`` here;
            the guard keeps the candidate (or the start) whose whole chain predicts ``y_Λv`` best, one chain per
            candidate. ``(1.0,)``: keep the calibrated parameters or nothing (the former guard). Measured on brain
            prior → knees (``docs/results/open_world.md``): where the whole γ failed the guard, a quarter of it
            passed and gained +0.30 dB (oracle bound +0.88); on the 9 other slices tried the result was unchanged.
        guard_splits: the final guard's validation folds ``K``: the held-out pool ``Λ_v`` is dealt into ``K`` disjoint
            folds (:func:`recon.adapt.selfsup.split_folds`); each candidate's chain runs ``K`` times, on the data
            less one fold, and is scored on that fold (K-fold cross-validation: the decision rests on all of ``Λ_v``
            and each chain sees more of the data); 1: one chain on ``y_Θv``, scored on ``Λ_v``. The calibration's own
            splits lie inside ``Θ_v``, disjoint from every fold. Costs ``K`` chains per candidate.
        cg_iters: CG iterations of the prox; seed: seeds every random draw.
        calib_iterate: data consistency of the calibration's own iterate (the one the θ-steps denoise).
            "full" (the first version): made consistent with all of ``y``, and every Adam step draws
            a fresh split — but the iterate then already carries ``y_Λ`` through the earlier x-steps, so
            the held-out loss is partly a training loss (it rewards passing the input through). "theta":
            one fixed calibration split (Θc, Λc), drawn with its own seed; the iterate is made consistent
            with ``y_Θc`` only and every θ-step is scored on ``y_Λc``, data it has never seen.
        acs_auto: keep the mask's own fully sampled centre in Θ (:func:`recon.coils.detect_acs`) instead
            of the central ``acs_fraction``; the held-out entries then all lie outside the scan's
            auto-calibration region, where the prior — not coil sensitivities — predicts them. A scan
            that samples nothing outside its centre falls back to ``acs_fraction``.
        heldout_weighting: "density" weighs the held-out loss (θ-steps and guard) by the inverse sampling density of
            the scan's mask (:func:`recon.adapt.selfsup.density_weights`), so that it scores the error over the
            k-space the mask reaches rather than where it samples densely; "none": unweighted. No change for 1-D
            masks with fewer than 128 sampled columns outside the centre (every site here). Measured on a
            prospective 2-D Poisson R = 8 case (``docs/results/priors.md``).
        step_selection: which parameters the x-steps denoise with after each θ-step: "validation" (the best so far
            by one denoising of the fixed Θ_v input at the schedule's middle level, scored on Λ_v) or "last" (Adam's
            latest iterate, as the oracle does; the final guard alone then judges the fit).
        validation_levels: noise levels of that validation loss (the mean over them): ``n`` levels geometric between
            the schedule's ends at ``q = 1/(n+1) … n/(n+1)`` of the way (1: its middle), each input ``x_Θv`` plus its
            own fixed noise draw. Costs ``n`` denoisings per θ-step.
        lr_schedule: Adam's step over the calibration: "constant" (``lr``) or "cosine" (``lr`` decayed to 0 along
            a half cosine over all the calibration's Adam steps).
    """

    num_steps: int = 60
    num_samples: int = 2
    sigma_start: float = 0.5
    sigma_end: float = 0.01
    eta: float = 1.0
    adapt: AdaptMode = "gamma"
    lora_rank: int = 4
    calibration_family: str = "norm_affine"
    calib_loss: str = "heldout"
    theta_steps: int = 4
    adapt_fraction: float = 0.7
    lr: float = 5e-2
    split_ratio: float = 0.4
    split_sampling: str = "random"
    calibrate_below: float | None = 0.1
    acs_fraction: float = 0.08
    lam: float = 0.1
    lam_rule: str = "fixed"
    prior_error: float = 0.035
    sure: bool = True
    lam_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    sure_refine: bool = True
    noise_sigma: float | None = None
    sure_epsilon: float = 0.1
    sure_sigma: str = "residual"
    misfit_limit: float | None = 2.5
    guard_scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    guard_splits: int = 1
    cg_iters: int = 10
    seed: int = 0
    calib_iterate: str = "theta"
    acs_auto: bool = True
    heldout_weighting: str = "density"
    step_selection: str = "validation"
    validation_levels: int = 1
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        for name in ("lam_grid", "guard_scales"):  # lists from YAML / the command line: tuples of floats
            try:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
            except (TypeError, ValueError):
                raise InputError(f"biasrecon.{name} must be a list of numbers, got {getattr(self, name)!r}") from None
        if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
            raise InputError(f"biasrecon.num_samples must be an integer >= 1, got {self.num_samples!r}")
        if self.num_steps < 1 or not (self.sigma_start > self.sigma_end > 0):
            raise InputError(
                f"biasrecon: need num_steps >= 1 and sigma_start > sigma_end > 0, got {self.num_steps}, "
                f"{self.sigma_start}, {self.sigma_end}"
            )
        if self.adapt not in ADAPT_MODES:
            raise InputError(f"biasrecon.adapt must be one of {', '.join(ADAPT_MODES)}, got {self.adapt!r}")
        if self.calibration_family not in FAMILIES:
            raise InputError(f"biasrecon.calibration_family must be one of {', '.join(FAMILIES)}, "
                             f"got {self.calibration_family!r}")
        if self.calib_loss not in CALIB_LOSSES:
            raise InputError(f"biasrecon.calib_loss must be one of {', '.join(CALIB_LOSSES)}, got {self.calib_loss!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise InputError(f"biasrecon.lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        if not 0 < self.split_ratio < 1:
            raise InputError(f"biasrecon.split_ratio must be in (0, 1), got {self.split_ratio}")
        if self.calibrate_below is not None and not (self.calibrate_below > 0 and math.isfinite(self.calibrate_below)):
            raise InputError(f"biasrecon.calibrate_below must be null or a positive number, got {self.calibrate_below}")
        if self.split_sampling not in ("random", "stratified"):
            raise InputError(f"biasrecon.split_sampling must be 'random' or 'stratified', got {self.split_sampling!r}")
        if self.misfit_limit is not None and not (self.misfit_limit > 0 and math.isfinite(self.misfit_limit)):
            raise InputError(f"biasrecon.misfit_limit must be null or a positive number, got {self.misfit_limit}")
        if isinstance(self.guard_splits, bool) or not isinstance(self.guard_splits, int) or self.guard_splits < 1:
            raise InputError(f"biasrecon.guard_splits must be an integer >= 1, got {self.guard_splits!r}")
        if not self.guard_scales or not all(t > 0 and math.isfinite(t) for t in self.guard_scales):
            raise InputError(f"biasrecon.guard_scales must be a non-empty list of positive numbers, got {list(self.guard_scales)}")
        if self.sure_sigma not in ("residual", "noise"):
            raise InputError(f"biasrecon.sure_sigma must be 'residual' or 'noise', got {self.sure_sigma!r}")
        if self.lam_rule not in ("fixed", "noise"):
            raise InputError(f"biasrecon.lam_rule must be 'fixed' or 'noise', got {self.lam_rule!r}")
        if not (self.prior_error > 0 and math.isfinite(self.prior_error)):
            raise InputError(f"biasrecon.prior_error must be a positive number, got {self.prior_error}")
        if self.heldout_weighting not in ("density", "none"):
            raise InputError(f"biasrecon.heldout_weighting must be 'density' or 'none', got {self.heldout_weighting!r}")
        if isinstance(self.validation_levels, bool) or not isinstance(self.validation_levels, int) \
                or self.validation_levels < 1:
            raise InputError(f"biasrecon.validation_levels must be an integer >= 1, got {self.validation_levels!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(f"biasrecon.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.step_selection not in ("validation", "last"):
            raise InputError(f"biasrecon.step_selection must be 'validation' or 'last', got {self.step_selection!r}")
        if self.calib_iterate not in ("full", "theta"):
            raise InputError(f"biasrecon.calib_iterate must be 'full' or 'theta', got {self.calib_iterate!r}")
        if self.lam <= 0 or not self.lam_grid or min(self.lam_grid) <= 0:
            raise InputError(f"biasrecon.lam and lam_grid must be positive, got {self.lam}, {self.lam_grid}")
        numbers = {"sigma_start": self.sigma_start, "sigma_end": self.sigma_end, "eta": self.eta, "lr": self.lr,
                   "lam": self.lam, "sure_epsilon": self.sure_epsilon, "adapt_fraction": self.adapt_fraction,
                   "lam_grid": max(self.lam_grid)}
        if self.noise_sigma is not None:
            numbers["noise_sigma"] = self.noise_sigma
        for key, value in numbers.items():
            if not math.isfinite(value):
                raise InputError(f"biasrecon.{key} must be a finite number, got {value}")
        checks = [("eta", 0 <= self.eta <= 1, "in [0, 1]"), ("lr", self.lr > 0, "positive"),
                  ("adapt_fraction", 0 <= self.adapt_fraction <= 1, "in [0, 1]"),
                  ("theta_steps", self.theta_steps >= 1, "an integer >= 1"),
                  ("cg_iters", self.cg_iters >= 1, "an integer >= 1"),
                  ("sure_epsilon", self.sure_epsilon > 0, "positive"),
                  ("noise_sigma", self.noise_sigma is None or self.noise_sigma >= 0, "null or >= 0")]
        for key, ok, expected in checks:
            if not ok:
                raise InputError(f"biasrecon.{key} must be {expected}, got {getattr(self, key)}")


@dataclass
class BiasReconResult:
    """The reconstruction and its trajectory.

    Attributes:
        image: complex ``(B, 1, H, W)`` final estimate (normalised scale).
        lam: the λ of the final data consistency; chain_lam: the λ of the chain's (``lam_rule``);
        noise_sigma: the measurement σ (the noise rule's, and SURE's with ``sure_sigma="noise"``);
        sure_sigma: the σ SURE used (None without SURE); misfit: ``(residual σ / noise σ)²``, the χ² of the
            forward model's least-squares fit of the data (≈ 1 when the model explains the data to within noise;
            None without SURE or the gate, or when it cannot be measured); calibration_skipped: why the
            calibration did not run (``misfit_limit``), else None — the image is then the unadapted prior's.
        history: one record per calibration step ``{"step", "sigma", "loss", "val_loss", "gamma"}``
            (``val_loss``: the one-denoising validation score of the best γ so far).
        sure_curve: ``[(λ, SURE(λ))]`` of the λ-step (empty without SURE).
        gamma: kept γ ``(L, B)`` (None unless ``adapt="gamma"``); val_loss_zero / val_loss_best:
            held-out loss on Λ_v of the chain run on ``y_Θv`` with γ = 0 and with the kept
            parameters (``val_loss_best <= val_loss_zero``); seconds: wall time; num_adapted: number of
            values the calibration fits (0 unadapted); lam is the learned λ for ``adapt="lam"``;
            fixed_image: the chain's output at the chain λ — the same method without SURE (with SURE, the
            λ-step's unperturbed copy, so both come from one run), complex ``(B, 1, H, W)``.
    """

    image: torch.Tensor
    lam: float
    noise_sigma: float | None
    history: list[dict] = field(default_factory=list)
    sure_curve: list[tuple[float, float]] = field(default_factory=list)
    gamma: torch.Tensor | None = None
    val_loss_zero: float | None = None
    val_loss_best: float | None = None
    seconds: float = 0.0
    chain_lam: float | None = None
    num_adapted: int = 0
    fixed_image: torch.Tensor | None = None
    sure_sigma: float | None = None
    misfit: float | None = None
    calibration_skipped: str | None = None


def _check_reference(reference: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The oracle's reference as real ``(B, 1, h, w)``, ``h ≤ H``, ``w ≤ W`` (the k-space ``(B, C, H, W)``)."""
    if reference is None:
        raise InputError("biasrecon.calib_loss is 'reference' (the oracle) but no reference image was given; "
                         "expected the clean reference of every slice (key 'reconstruction_clean').")
    ref = reference.abs() if torch.is_complex(reference) else reference
    if ref.dim() == 3:
        ref = ref[:, None]
    if ref.dim() != 4 or ref.shape[0] != shape[0] or ref.shape[1] != 1 or ref.shape[2] > shape[2] \
            or ref.shape[3] > shape[3] or not bool(torch.isfinite(ref).all()):
        raise InputError(f"biasrecon: the reference has shape {tuple(reference.shape)}, expected finite "
                         f"({shape[0]}, 1, h, w) with h <= {shape[2]}, w <= {shape[3]}.")
    return ref.float()


def reference_loss(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The oracle's loss: ``mean_b ‖crop(|x_b|) − r_b‖² / ‖r_b‖²`` (crop to the reference's centre).

    Shape: ``x`` complex ``(B, 1, H, W)``; ``reference`` real ``(B, 1, h, w)``; returns a real scalar.
    """
    magnitude = center_crop(x.abs(), tuple(reference.shape[-2:]))
    dims = tuple(range(1, x.dim()))
    return ((magnitude - reference).square().sum(dim=dims) / reference.square().sum(dim=dims)).mean()


def _sense_start(op: Sense, kspace: torch.Tensor, cg_iters: int) -> torch.Tensor:
    """The SENSE estimate every chain starts from: ``(AᴴA + 10⁻³I)⁻¹Aᴴy``. Shape ``(B, 1, H, W)``."""
    return conjugate_gradient(op.normal, op.A_adjoint(kspace), 1e-3, max_iter=cg_iters).x


@dataclass(frozen=True)
class SureChain:
    """The x-step chain run once on ``y`` and on the probed ``y + εb``: the λ-step's one costly part.

    Every candidate λ is then one prox away: ``x₀(λ) = (AᴴA + λI)⁻¹(Aᴴyₛ + λx̂ₛ)`` for both copies
    ``s`` (:meth:`prox`), ``x̂`` the chain's last denoised estimate of each copy.

    Shape: ``ys`` ``(2B, C, H, W)`` = ``[y; y + εb]`` complex64, ``pair`` the Sense operator stacked twice,
    ``probe`` ``b`` like ``y`` (zero where not sampled), ``x_hat`` ``(2B, 1, H, W)``, ``fixed`` ``(B, 1, H, W)``
    the unperturbed chain's own output at its fixed λ; ``sampled`` the count ``m`` of sampled entries of ``y``.
    """

    pair: Sense
    ys: torch.Tensor
    probe: torch.Tensor
    epsilon: float
    x_hat: torch.Tensor
    fixed: torch.Tensor
    sampled: int
    cg_iters: int

    def prox(self, lam: float) -> torch.Tensor:
        """``x₀(λ)`` of both copies, ``(2B, 1, H, W)``: the first ``B`` from ``y``, the rest from ``y + εb``."""
        return prox(self.pair, self.ys, self.x_hat, lam, self.cg_iters)


class _CalibratingPrior:
    """The prior as the calibration's sampler sees it: a θ-step before each denoising, then the
    denoising with the kept parameters (so the θ-steps ride along the sampler's own loop)."""

    def __init__(self, optimizer: "BiasRecon", callback: Callable[[dict], None] | None) -> None:
        self.optimizer, self.callback = optimizer, callback

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.optimizer._acts_at(sigma):  # no θ-step (and no history record) where γ does not act
            record = self.optimizer._calibration_step(x, sigma)
            if self.callback is not None:
                self.callback(record)
        return self.optimizer.prior.denoise(x, sigma)



class _Progress:
    """One tqdm bar over a whole run, in network evaluations, described by phase, sample ``j/K`` and level ``k/N``.

    A calibration level costs ``1 + validation_levels + 3·theta_steps`` evaluations (the x-step's and the
    validation's denoisings, each Adam step's forward and backward), a chain level one per copy of the batch, so the bar's estimate of the
    time left weighs the phases by what they cost.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="eval", disable=not enabled, leave=False, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def tick(self, label: str, cost: int) -> None:
        self.bar.set_description_str(label, refresh=False)
        self.bar.update(cost)

    def close(self) -> None:
        self.bar.close()


class BiasRecon:
    """The alternating optimizer for one batch of slices sharing one operator.

    Shape: ``op`` a :class:`Sense` on ``(B, C, H, W)`` with an ``(H, W)`` or ``(B, 1, H, W)`` mask
    (the sampled sets Ω); ``kspace`` ``(B, C, H, W)`` complex, zero outside Ω; the result ``(B, 1, H, W)``.

    Args:
        prior: the denoiser (an ``nn.Module`` when ``adapt != "none"``; a
            :class:`recon.adapt.CalibratedPrior` for a γ fixed beforehand); never modified — full
            fine-tuning works on a copy, calibration hooks are removed when :meth:`run` ends.
        op, kspace: the measurement operator ``A = M F S`` and the measured ``y``.
        settings: :class:`BiasReconSettings`.
        sampler: the loop and its noise levels (:class:`Sampler`).
        calibration_layers / calibration_bands: shape of the calibration built for ``adapt="gamma"``.
    """

    def __init__(self, prior: Prior, op: Sense, kspace: torch.Tensor, settings: BiasReconSettings, *,
                 sampler: Sampler, calibration_layers: int = 24, calibration_bands: int = 3,
                 reference: torch.Tensor | None = None) -> None:
        if tuple(kspace.shape) != op.shape:
            raise InputError(f"k-space has shape {tuple(kspace.shape)}, expected {op.shape} for this operator")
        self.s, self.op, self.y, self.sampler = settings, op, kspace, sampler
        self.reference = None
        if settings.calib_loss == "reference" and settings.adapt != "none":
            self.reference = _check_reference(reference, op.shape)
        self.noise_sigma = settings.noise_sigma
        if settings.lam_rule == "noise" or settings.sure:
            if self.noise_sigma is None:
                self.noise_sigma = estimate_sigma(kspace, op.mask)
        self.sure_sigma, self.misfit, self.calibration_skipped = self.noise_sigma, None, None
        gate = settings.misfit_limit is not None and settings.adapt != "none" and settings.calib_loss == "heldout"
        if settings.sure or gate:
            noise = self.noise_sigma
            if noise is None:  # the gate alone: the corner estimate, where the periphery allows one
                try:
                    noise = estimate_sigma(kspace, op.mask)
                except InputError:
                    noise = None
            residual = residual_sigma(op, kspace)
            if residual is not None and noise:
                self.misfit = (residual / noise) ** 2
            if settings.sure and residual is not None and settings.sure_sigma == "residual":
                self.sure_sigma = residual
        if gate and self.misfit is not None and self.misfit > settings.misfit_limit:
            self.calibration_skipped = (f"not calibrated: the forward model leaves chi2 = {self.misfit:.2f} times the "
                                        f"noise unexplained (biasrecon.misfit_limit = {settings.misfit_limit:g}); "
                                        f"the held-out k-space loss would fit the coil maps' error")
        self.lam = settings.lam  # λ of the chain's data consistency
        if settings.lam_rule == "noise":
            self.lam = min(max(self.noise_sigma**2 / settings.prior_error**2, 1e-4), 1e2)
        self.device = kspace.device
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.sigmas = [float(v) for v in sampler.levels(settings.sigma_start, settings.sigma_end, settings.num_steps)]
        self.history: list[dict] = []
        self.prior, self.calibration = prior, None
        if settings.adapt != "none" and not isinstance(prior, nn.Module):
            raise InputError(f"biasrecon.adapt={settings.adapt!r} needs the prior to be a torch nn.Module")
        if settings.adapt == "gamma":
            calibration = make_calibration(settings.calibration_family, prior,
                                           sigma_range=(settings.sigma_start, settings.sigma_end),
                                           layers=calibration_layers, bands=calibration_bands,
                                           below=settings.calibrate_below)
            levels = self.sigmas[: math.ceil(settings.adapt_fraction * len(self.sigmas))]
            if levels and not any(calibration.acts_at(s) for s in levels):  # refused before any hook is attached
                raise InputError(
                    f"biasrecon.calibrate_below={settings.calibrate_below:g} leaves no level to calibrate: the first "
                    f"adapt_fraction={settings.adapt_fraction:g} of the {len(self.sigmas)} levels end at sigma "
                    f"{levels[-1]:.3g}; expected one at or below it (raise num_steps or adapt_fraction, or set "
                    f"calibrate_below >= {levels[-1]:.3g}, or null for every level).")
            self.calibration = calibration.attach()
            self.prior = self.calibration  # D_γ where it acts: the hooks, and the family's own change of the denoiser
            self.params = [self.calibration.gamma]
        elif settings.adapt == "full":
            self.prior = copy.deepcopy(prior)
            for p in self.prior.parameters():
                p.requires_grad_(True)
            self.params = list(self.prior.parameters())
        elif settings.adapt == "lora":
            self.calibration = LoRA(prior, rank=settings.lora_rank,
                                    generator=torch.Generator().manual_seed(settings.seed + 2203)).attach()
            self.params = list(self.calibration.parameters())
        elif settings.adapt == "lam":  # ρ = log λ, the prior untouched
            self.log_lam = nn.Parameter(torch.tensor(math.log(self.lam)))
            self.params = [self.log_lam]
        else:
            self.params = []
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr) if self.params else None
        self._adam_steps = 0  # Adam updates so far (lr_schedule)
        self._initial = [p.detach().clone() for p in self.params]
        self._best = [p.detach().clone() for p in self.params]
        self._iterate = [p.detach().clone() for p in self.params]
        self.val_loss_zero = self.val_loss_best = None
        self.calibrated = False  # calibrate() has run (calibrate() then run() calibrates once)
        self._progress: _Progress | None = None  # the bar of the running run() / calibrate(), if any
        self.calib_op, self.calib_y, self.calib_lambda = op, kspace, None
        self.x: torch.Tensor | None = None  # the calibration's own iterate
        self.heldout_weight = self._heldout_weight() if self.params and settings.calib_loss == "heldout" else None
        if self.params and self.calibration_skipped is None:  # the calibration's own iterate (x_step_chain starts afresh)
            self._setup_validation()  # Λ_v first: the calibration only ever sees y_Θv
            if settings.calib_iterate == "theta" and self.reference is None:  # a fixed split: never sees y_Λc
                theta_c, self.calib_lambda = self._split(torch.Generator().manual_seed(settings.seed + 3571),
                                                         self.val_theta)
                self.calib_op, self.calib_y = theta_operator(op, theta_c), kspace * theta_c
            self.val_loss_zero = self.val_loss_best = self._validation_loss()
        calibrates = self.params and self.calibration_skipped is None
        self.adapt_steps = math.ceil(settings.adapt_fraction * len(self.sigmas)) if calibrates else 0

    # -- the x-step chain ---------------------------------------------------------------------------
    def x_step_chain(self, op: Sense, kspace: torch.Tensor, lam: float | torch.Tensor, copies: int = 1,
               progress: bool = False, phase: str = "chain") -> tuple[torch.Tensor, torch.Tensor]:
        """Every x-step (the sampler's loop, the prox as data consistency) from the SENSE start.

        Deterministic for a seed; the batch may hold ``copies`` copies of ``n`` scans (SURE probes),
        which receive the same noise. With ``num_samples`` K > 1 the chain runs K times (seeds
        ``seed + k``) and both outputs are the means over the K runs (the prox is affine in ``x̂``,
        so the mean ``x₀`` is the prox of the mean ``x̂``). Shape: ``kspace`` ``(copies·n, C, H, W)``;
        ``lam`` a float or ``(copies·n,)``; returns the final ``x₀`` and the last denoiser estimate
        ``x̂`` (before its prox), each ``(copies·n, 1, H, W)``. ``progress``: a bar ``phase: sample j/K,
        level k/N`` with the time left (inside :meth:`run` and :meth:`calibrate`, their bar counts the levels).
        """
        own = self._progress is None and progress
        if own:
            self._progress = _Progress(self.s.num_samples * len(self.sigmas) * copies, True)
        try:
            return self._chains(op, kspace, lam, copies, phase)
        finally:
            if own:
                self._progress.close()
                self._progress = None

    def _tick(self, label: str, cost: int) -> None:
        if self._progress is not None:
            self._progress.tick(label, cost)

    def _chains(self, op: Sense, kspace: torch.Tensor, lam: float | torch.Tensor, copies: int,
                phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`x_step_chain`'s work: the ``num_samples`` chains and the means of their outputs."""
        lam_t = torch.as_tensor(lam, dtype=kspace.real.dtype, device=kspace.device).reshape(-1)
        x_start = _sense_start(op, kspace, self.s.cg_iters)
        x0_sum, x_hat_sum = None, None
        samples, levels = self.s.num_samples, len(self.sigmas)
        for k in range(samples):
            last: dict[str, torch.Tensor] = {}
            level = [0]

            def dc(x_hat: torch.Tensor, sigma: float) -> torch.Tensor:
                last["x_hat"] = x_hat
                level[0] += 1
                self._tick(f"{phase}: sample {k + 1}/{samples}, level {level[0]}/{levels}", copies)
                return prox(op, kspace, x_hat, lam_t, self.s.cg_iters)

            x0 = self.sampler(self.prior, tuple(x_start.shape), self.sigmas, dc=dc, eta=self.s.eta,
                              generator=torch.Generator().manual_seed(self.s.seed + k), x_start=x_start,
                              copies=copies)
            x0_sum = x0 if x0_sum is None else x0_sum + x0
            x_hat_sum = last["x_hat"] if x_hat_sum is None else x_hat_sum + last["x_hat"]
        return x0_sum / self.s.num_samples, x_hat_sum / self.s.num_samples  # exact for one sample

    # -- calibration ------------------------------------------------------------------------------
    def _split(self, generator: torch.Generator, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Θ/Λ split of each scan's sampled set (``mask``, default the operator's); ``(H, W)`` or ``(B, 1, H, W)``
        like the mask."""
        mask = self.op.mask if mask is None else mask

        def one(m: torch.Tensor) -> KSpaceSplit:
            return split_mask(m, generator=generator, ratio=self.s.split_ratio, acs=self._acs(m),
                              stratified=self.s.split_sampling == "stratified")

        splits = [one(m) for m in self._scan_masks(mask)]
        if len(splits) == 1:
            return splits[0].theta, splits[0].lam
        return torch.stack([t.theta for t in splits])[:, None], torch.stack([t.lam for t in splits])[:, None]

    def _scan_masks(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """The ``(H, W)`` mask of each scan: one for an ``(H, W)`` (or shared) mask, else one per batch item."""
        h, w = self.op.shape[-2:]
        if mask.dim() < 2:
            mask = mask.expand(h, w)
        if mask.dim() == 2 or mask.shape[:-2].numel() == 1:
            return [mask.reshape(h, w)]
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise InputError(f"BiasRecon needs a mask of shape (H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        return [m[0] for m in mask.expand(self.op.shape[0], 1, h, w)]

    def _acs(self, m: torch.Tensor) -> float | torch.Tensor:
        """The region of one scan's ``(H, W)`` mask kept in Θ: its own fully sampled centre (``acs_auto``, when
        something is sampled outside it), else the central ``acs_fraction``."""
        if self.s.acs_auto:
            centre = detect_acs(m)
            if bool(((m != 0) & (centre == 0)).any()):  # else nothing outside it to hold out
                return centre
        return self.s.acs_fraction

    def _heldout_weight(self) -> torch.Tensor | None:
        """The held-out loss's weights (``heldout_weighting="density"``: :func:`density_weights` of each scan's mask),
        ``(H, W)`` or ``(B, 1, H, W)`` like the mask; None for the unweighted loss."""
        if self.s.heldout_weighting == "none":
            return None
        masks = self._scan_masks(self.op.mask)
        weights = [density_weights(m, self._acs(m)) for m in masks]
        if all(wt is None for wt in weights):
            return None
        weights = [(m != 0).to(torch.float32) if wt is None else wt for wt, m in zip(weights, masks)]
        return weights[0] if len(weights) == 1 else torch.stack(weights)[:, None]

    def _setup_validation(self) -> None:
        vgen = torch.Generator().manual_seed(self.s.seed + 7919)
        self.val_theta, self.val_lambda = self._split(vgen)
        self.val_op = theta_operator(self.op, self.val_theta)
        self.val_y = self.y * self.val_theta
        if self.s.guard_splits > 1:  # K disjoint folds of Λ_v, each scan's own; Ω as the splits see it
            self._sampled = (self.val_theta + self.val_lambda).to(self.val_theta.dtype)
            fgen = torch.Generator().manual_seed(self.s.seed + 6151)
            per_scan = [split_folds(m, self.s.guard_splits, generator=fgen) for m in self._scan_masks(self.val_lambda)]
            if len(per_scan) == 1:
                self.val_folds = per_scan[0]
            else:  # fold k of every scan, (B, 1, H, W)
                self.val_folds = [torch.stack([folds[k] for folds in per_scan])[:, None]
                                  for k in range(self.s.guard_splits)]
        if self.reference is not None:  # the oracle scores against the reference: all of y, nothing held out
            self.val_op, self.val_y, self.val_lambda = self.op, self.y, None
        with torch.no_grad():  # a denoiser input from Θ_v alone, mid-schedule noise, fixed noise draw
            x_theta = _sense_start(self.val_op, self.val_y, self.s.cg_iters)
        n = self.s.validation_levels  # geometric between the schedule's ends, at q = 1/(n+1) … n/(n+1)
        self.val_sigmas = [math.sqrt(self.sigmas[0] * self.sigmas[-1])] if n == 1 else \
            [self.sigmas[0] ** (1 - q) * self.sigmas[-1] ** q for q in ((i + 1) / (n + 1) for i in range(n))]
        below = getattr(self.calibration, "below", None)
        if below is not None:  # scored where γ acts, else every candidate scores as γ = 0 and none is kept
            self.val_sigmas = [min(s, below) for s in self.val_sigmas]
        self.val_xs = [x_theta + s * complex_normal(tuple(x_theta.shape), vgen, device=self.device)
                       for s in self.val_sigmas]

    @torch.no_grad()
    def _validation_loss(self) -> float:
        losses = []
        for x, sigma in zip(self.val_xs, self.val_sigmas):
            x_dc = prox(self.val_op, self.val_y, self.prior.denoise(x, sigma), self.lam, self.s.cg_iters)
            losses.append(float(self._loss(x_dc, self.val_lambda)))
        return sum(losses) / len(losses)

    def _loss(self, x: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
        """The calibration's loss of an estimate ``x`` ``(B, 1, H, W)``: the held-out k-space error on ``held``
        (:func:`recon.adapt.selfsup.heldout_loss`) or, for the oracle, the error against the reference."""
        if self.reference is not None:
            return reference_loss(x, self.reference)
        return heldout_loss(self.op, self.y, x, held, self.heldout_weight)

    def _set_params(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)
        self._sync_lam()

    def _sync_lam(self) -> None:
        """``adapt="lam"``: the chain's λ follows the learned ρ (λ = exp ρ)."""
        if self.s.adapt == "lam":
            self.lam = float(self.log_lam.detach().exp())

    def theta_step(self, x: torch.Tensor, sigma: float) -> float:
        """A few Adam steps on the calibration parameters, denoising the iterate ``x`` at level ``sigma``;
        the last loss. Leaves the best parameters so far in place (the x-step denoises with them)."""
        if not self._acts_at(sigma):
            return float("nan")  # γ does not act at this level (calibrate_below): nothing to fit
        self._set_params(self._iterate)  # Adam continues from its own iterate, not from the kept best
        loss_value = float("nan")
        with torch.enable_grad():
            for _ in range(self.s.theta_steps):
                if self.reference is not None:  # the oracle: its iterate's data (all of y unless a caller set less)
                    theta_op, y_theta, lam_mask = self.calib_op, self.calib_y, None
                elif self.calib_lambda is None:
                    theta, lam_mask = self._split(self.gen, self.val_theta)
                    theta_op, y_theta = theta_operator(self.op, theta), self.y * theta
                else:
                    theta_op, y_theta, lam_mask = self.calib_op, self.calib_y, self.calib_lambda
                lam = self.log_lam.exp() if self.s.adapt == "lam" else self.lam
                x_hat = self.prior.denoise(x.detach(), sigma)
                x_dc = prox(theta_op, y_theta, x_hat, lam, self.s.cg_iters)
                loss = self._loss(x_dc, lam_mask)
                self._schedule_lr()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_value = float(loss.detach())
        self._sync_lam()
        self._iterate = [p.detach().clone() for p in self.params]
        if self.reference is not None or self.s.step_selection == "last":  # the latest fit; the guard judges it
            self._best = self._iterate
        else:
            val = self._validation_loss()
            if val < self.val_loss_best:
                self.val_loss_best, self._best = val, [p.detach().clone() for p in self.params]
        self._set_params(self._best)
        return loss_value

    def _schedule_lr(self) -> None:
        """Set Adam's step for its next update (``lr_schedule``) and count the update."""
        if self.s.lr_schedule == "cosine":
            total = max(self._fitted_levels() * self.s.theta_steps, 1)
            lr = 0.5 * self.s.lr * (1 + math.cos(math.pi * min(self._adam_steps, total) / total))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self._adam_steps += 1

    def _calibration_step(self, x: torch.Tensor, sigma: float) -> dict:
        """The θ-step at the calibration iterate ``x`` (level ``sigma``) and its history record."""
        self.x = x
        loss = self.theta_step(x, sigma)
        record = {
            "step": len(self.history),
            "sigma": sigma,
            "loss": loss,
            "val_loss": self.val_loss_best,
            "gamma": self.calibration.gamma.detach().cpu().tolist() if self.s.adapt == "gamma" else None,
        }
        self.history.append(record)
        return record

    def chain_heldout_loss(self) -> float:
        """Held-out loss on Λ_v of the whole x-step chain run on ``y_Θv`` alone (current parameters); with
        ``guard_splits`` K > 1 the mean over the K folds of Λ_v, each chain run on the data less its fold."""
        if self.val_lambda is None or self.s.guard_splits == 1:
            x0, _ = self.x_step_chain(self.val_op, self.val_y, self.lam, phase="guard")
            return float(self._loss(x0, self.val_lambda))
        losses = []
        for k, fold in enumerate(self.val_folds):
            keep = self._sampled - fold
            x0, _ = self.x_step_chain(theta_operator(self.op, keep), self.y * keep, self.lam,
                                      phase=f"guard fold {k + 1}/{len(self.val_folds)}")
            losses.append(float(self._loss(x0, fold)))
        return sum(losses) / len(losses)

    def final_guard(self) -> None:
        """Keep the candidate ``p₀ + t (p_best − p₀)``, ``t`` in ``guard_scales``, whose chain predicts ``y_Λv``
        best, and only if better than the start's (γ = 0's) chain; else the start."""
        zero = [torch.zeros_like(p) for p in self.params] if self.s.adapt == "gamma" else self._initial
        best = self._best
        candidates = []
        for t in self.s.guard_scales:
            params = best if t == 1.0 else [z + t * (b - z) for z, b in zip(zero, best)]
            self._set_params(params)
            candidates.append((self.chain_heldout_loss(), params))
        self._set_params(zero)
        reference = self.chain_heldout_loss()
        self.val_loss_zero = reference
        kept, params = min(candidates, key=lambda c: c[0])
        if kept < reference:
            self._best, self.val_loss_best = params, kept
            self._set_params(params)
        else:
            self._best, self.val_loss_best = zero, reference

    # -- λ-step and the reconstruction --------------------------------------------------------
    @torch.no_grad()
    def lambda_step(self) -> tuple[float, torch.Tensor, list[tuple[float, float]], torch.Tensor]:
        """λ of the final data consistency minimising Monte-Carlo SURE; returns ``(λ, image, curve, fixed)``,
        ``fixed`` the chain's own output at the fixed λ (the unperturbed copy: the method without SURE).

        The chain runs at the fixed ``lam`` (it shapes the null space); the last prox
        ``x₀(λ) = (AᴴA + λI)⁻¹(Aᴴy + λx̂)`` mostly changes the measured part (for one coil, only it), so
        the measurement-domain risk that SURE estimates is the error that λ controls — provided the forward
        model explains the data; where it does not, ``sure_sigma="residual"`` counts the misfit as noise.
        Two parts: :meth:`sure_chain` runs the chain, :meth:`choose_lambda` picks λ on it.
        """
        chain = self.sure_chain()
        lam, image, curve = self.choose_lambda(chain)
        return lam, image, curve, chain.fixed

    @torch.no_grad()
    def sure_chain(self, sigma: float | None = None) -> SureChain:
        """Run the x-step chain at the fixed λ on ``y`` and on ``y + εb`` together (the λ-step's first part).

        Maths: ``b = M(n₁ + i n₂)`` from the seeded probe generator (``seed + 104729``),
        ``ε = sure_epsilon · σ``, σ the given ``sigma`` or :attr:`sure_sigma`; the chain's ``x̂`` depends on
        ``y``, so SURE's divergence runs through the whole chain.
        Shape: see :class:`SureChain` (``B`` = the batch of ``y``).
        """
        sigma = self.sure_sigma if sigma is None else sigma
        n = self.y.shape[0]
        b = probe(self.op.mask, tuple(self.y.shape), torch.Generator().manual_seed(self.s.seed + 104729),
                  device=self.device)
        eps = self.s.sure_epsilon * max(sigma, 1e-8)
        ys = torch.cat([self.y, self.y + eps * b])
        mask = self.op.mask.repeat(2, 1, 1, 1) if self.op.mask.dim() == 4 else self.op.mask
        pair = Sense(self.op.sens_maps.repeat(2, 1, 1, 1), mask, fused=self.op.fused)
        x0, x_hat = self.x_step_chain(pair, ys, self.lam, copies=2, phase="SURE chain")
        return SureChain(pair=pair, ys=ys, probe=b, epsilon=eps, x_hat=x_hat, fixed=x0[:n],
                         sampled=sampled_count(self.op.mask, tuple(self.y.shape)), cg_iters=self.s.cg_iters)

    @torch.no_grad()
    def choose_lambda(self, chain: SureChain, sigma: float | None = None,
                      ) -> tuple[float, torch.Tensor, list[tuple[float, float]]]:
        """λ of ``lam_grid`` (refined if ``sure_refine``) minimising SURE on ``chain``; returns ``(λ, x₀(λ), curve)``.

        Maths: ``SURE(λ) = ‖y − f(y)‖² − mσ² + σ² Re⟨b, f(y + εb) − f(y)⟩/ε`` over the ``m`` sampled entries
        (:func:`recon.sure.sure_over_grid`), ``f(y) = A x₀(y; λ)``; σ the given ``sigma`` or :attr:`sure_sigma`.
        Shape: ``x₀(λ)`` ``(B, 1, H, W)``; ``curve`` the ``(λ, SURE)`` pairs evaluated.
        """
        sigma = self.sure_sigma if sigma is None else sigma
        n = self.y.shape[0]
        images: list[torch.Tensor] = []

        def measure(lam: float) -> tuple[torch.Tensor, torch.Tensor]:
            x0 = chain.prox(lam)
            images.append(x0[:n])
            f = chain.pair.A(x0)
            return f[:n], f[n:]

        choice = sure_over_grid(self.y, chain.probe, chain.epsilon, sigma, chain.sampled, self.s.lam_grid, measure,
                                refine=self.s.sure_refine)
        return choice.lam, images[choice.index], choice.curve

    def calibrate(self, progress: bool = False, callback: Callable[[dict], None] | None = None) -> None:
        """Every calibration step along the sampler's loop, then :meth:`final_guard` (nothing when
        nothing is calibrated, or when it has run already).

        Leaves the kept parameters in place (the calibration stays attached): use it to fit a site's γ
        once (mode site) with the same guarantee as :meth:`run` — the kept γ's chain predicts ``y_Λv``
        no worse than γ = 0's. ``callback(record)`` after each θ-step (the record of :attr:`history`).
        ``progress``: a bar with the level ``k/N`` and the estimated time left.
        """
        if not self.params or self.calibrated or self.calibration_skipped is not None:
            return
        own = self._progress is None and progress
        if own:
            self._progress = _Progress(self._calibration_cost(), True)
        try:
            if self.adapt_steps:
                with torch.no_grad():
                    x_start = _sense_start(self.calib_op, self.calib_y, self.s.cg_iters)
                level = [0]

                def dc(x_hat: torch.Tensor, sigma: float) -> torch.Tensor:
                    level[0] += 1
                    self._tick(f"calibrating: level {level[0]}/{self.adapt_steps}",
                               self._level_cost() if self._acts_at(sigma) else 1)
                    return prox(self.calib_op, self.calib_y, x_hat, self.lam, self.s.cg_iters)

                self.x = self.sampler(_CalibratingPrior(self, callback), tuple(x_start.shape),
                                      self.sigmas[: self.adapt_steps], dc=dc, eta=self.s.eta, generator=self.gen,
                                      x_start=x_start)
            self.final_guard()
            self.calibrated = True
        finally:
            if own:
                self._progress.close()
                self._progress = None

    def _calibration_cost(self) -> int:
        """The calibration's network evaluations (the bar's units): its levels and the guard's chains."""
        if not self.params or self.calibrated or self.calibration_skipped is not None:
            return 0
        chain = self.s.num_samples * len(self.sigmas) * self.s.guard_splits
        fitted = self._fitted_levels()
        return fitted * self._level_cost() + (self.adapt_steps - fitted) + (len(self.s.guard_scales) + 1) * chain

    def _acts_at(self, sigma: float) -> bool:
        """Whether the calibration acts (and a θ-step runs) at level ``sigma`` (``calibrate_below``)."""
        return self.calibration is None or getattr(self.calibration, "acts_at", lambda _: True)(sigma)

    def _fitted_levels(self) -> int:
        """The calibration levels with θ-steps: the first ``adapt_steps`` levels where the calibration acts."""
        return sum(self._acts_at(s) for s in self.sigmas[: self.adapt_steps])

    def _level_cost(self) -> int:
        """Network evaluations of one calibration level: the x-step, the validation loss, the Adam steps."""
        return 1 + self.s.validation_levels + 3 * self.s.theta_steps

    def run(self, progress: bool = False, callback: Callable[[dict], None] | None = None) -> BiasReconResult:
        """Calibrate (if asked), then the λ-step (if asked) or one x-step chain at the fixed λ."""
        start = time.perf_counter()
        chain = self.s.num_samples * len(self.sigmas) * (2 if self.s.sure else 1)
        self._progress = _Progress(self._calibration_cost() + chain, progress)
        try:
            self.calibrate(progress, callback)
            if self.s.sure:
                lam, image, curve, fixed = self.lambda_step()
            else:
                lam, curve = self.lam, []
                image, _ = self.x_step_chain(self.op, self.y, lam)
                fixed = image
        finally:
            self._progress.close()
            self._progress = None
            if self.calibration is not None:
                self.calibration.detach()
        gamma = self.calibration.gamma.detach().clone() if self.s.adapt == "gamma" else None
        return BiasReconResult(image=image, lam=lam, noise_sigma=self.noise_sigma, history=self.history,
                               sure_curve=curve, gamma=gamma, val_loss_zero=self.val_loss_zero,
                               val_loss_best=self.val_loss_best, seconds=time.perf_counter() - start,
                               chain_lam=self.lam, num_adapted=sum(p.numel() for p in self.params),
                               fixed_image=fixed, sure_sigma=self.sure_sigma if self.s.sure else None,
                               misfit=self.misfit, calibration_skipped=self.calibration_skipped)
