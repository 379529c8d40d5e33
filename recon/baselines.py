"""Classical reconstruction baselines behind one call signature, and best-λ tuning.

Every method is a function ``(sample, sens_maps, **params) -> Reconstruction`` registered in
:data:`METHODS`; :func:`run_baseline` looks a method up by name, checks the inputs and the
parameter names, and calls it. The prior-based methods (``unadapted``, ``unadapted_sure``) plug
into the same registry with the same signature.

Methods (``A = M F S`` the SENSE operator of the sample's mask and the given maps, ``y`` the
sample's normalised k-space):

* ``zero_filled``: ``x = Aᴴ y`` with unit-norm maps ``S_c / sqrt(Σ_c' |S_c'|²)`` (zero where all
  maps vanish). With maps that are unit-norm everywhere and a fully sampled mask this is the
  complex image whose magnitude is the RSS of the coil images; for single-coil data (maps of
  ones) it is ``ifft2c(y)``, whose magnitude *is* the RSS.
* ``sense``: SENSE-L2, ``x = (AᴴA + λI)⁻¹ Aᴴ y`` by conjugate gradient
  (:func:`recon.operators.conjugate_gradient`).
* ``l1wavelet``: ``argmin ½‖A x − y‖² + λ‖Ψ x‖₁`` (Daubechies-4 wavelets) by
  ``sigpy.mri.app.L1WaveletRecon`` (FISTA).
* ``tv``: ``argmin ½‖A x − y‖² + λ‖∇x‖₁`` (circular finite differences) by
  ``sigpy.mri.app.TotalVariationRecon`` (primal-dual hybrid gradient, balanced steps).

sigpy picks its step sizes with a power method started from numpy's *global* random state; here
the step is computed beforehand by the same power method on the same sigpy operators, started from
an explicit seed (``seed``), and passed to the app, so a reconstruction is reproducible.

Images are returned on the sample's normalised scale; ``Sample.denormalize`` brings them back to
the file's scale. ``Reconstruction.seconds`` is the wall time of the method itself: sensitivity
maps are estimated once per slice (:func:`sensitivity_maps`) and shared by every method.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.coils import espirit_maps
from recon.data.sample import Sample
from recon.errors import InputError
from recon.metrics import psnr
from recon.operators import Sense, conjugate_gradient

__all__ = [
    "Reconstruction",
    "METHODS",
    "CLASSICAL_METHODS",
    "PRIOR_METHODS",
    "unadapted",
    "unadapted_sure",
    "TUNABLE_METHODS",
    "DEFAULT_LAMBDA_GRID",
    "run_baseline",
    "method_parameters",
    "check_params",
    "zero_filled",
    "sense",
    "l1_wavelet",
    "total_variation",
    "LambdaScore",
    "slice_psnr",
    "tune_lambda",
    "sensitivity_maps",
    "ESPIRIT_CROP",
    "acs_width",
    "center_crop",
    "max_eigenvalue",
]

_POWER_ITERATIONS = 30  # sigpy's default max_power_iter
_MIN_CALIB_WIDTH = 7  # espirit_maps needs calib_width > its kernel width 6
_MAX_CALIB_WIDTH = 24  # sigpy's default calibration width

ESPIRIT_CROP = 0.1
"""ESPIRiT eigenvalue crop of :func:`sensitivity_maps` (sigpy's default 0.95 fails on small ACS)."""


@dataclass(frozen=True)
class Reconstruction:
    """The result of one method on one slice.

    Shape: ``image`` ``(H, W)`` complex64 on the CPU, on the sample's normalised scale.

    Attributes:
        image: The complex reconstruction.
        seconds: Wall time of the method (sensitivity maps excluded).
        params: The parameters actually used, defaults included.
    """

    image: torch.Tensor
    seconds: float
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _sense_operator(sample: Sample, sens_maps: torch.Tensor) -> tuple[Sense, torch.Tensor]:
    """``(A, y)``: the Sense operator of the sample's mask and maps, and its k-space ``(1, C, H, W)``."""
    maps = sens_maps.to(torch.complex64)
    op = Sense(maps.unsqueeze(0), sample.mask.to(maps.device))
    return op, sample.kspace.to(maps.device).unsqueeze(0)


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _check_lam(lam: float, method: str) -> float:
    value = _as_float(lam)
    if value is None or not (math.isfinite(value) and value >= 0):
        raise InputError(f"{method}: key 'lam' must be a non-negative finite number, got {lam!r}.")
    return value


def _check_iterations(max_iter: int, method: str) -> int:
    value = _as_float(max_iter)
    if value is None or value != int(value) or value < 1:
        raise InputError(f"{method}: key 'max_iter' must be a positive integer, got {max_iter!r}.")
    return int(value)


def _check_step(step: float | None, method: str) -> float | None:
    if step is None:
        return None
    value = _as_float(step)
    if value is None or not (math.isfinite(value) and value > 0):
        raise InputError(f"{method}: key 'step' must be a positive finite number or None, got {step!r}.")
    return value


def _check_tol(tol: float, method: str) -> float:
    value = _as_float(tol)
    if value is None or not (math.isfinite(value) and value >= 0):
        raise InputError(f"{method}: key 'tol' must be a non-negative finite number, got {tol!r}.")
    return value


def _check_seed(seed: int, method: str) -> int:
    value = _as_float(seed)
    if value is None or value != int(value) or value < 0:
        raise InputError(f"{method}: key 'seed' must be a non-negative integer, got {seed!r}.")
    return int(value)


_PARAMETER_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "lam": _check_lam,
    "max_iter": _check_iterations,
    "step": _check_step,
    "tol": _check_tol,
    "seed": _check_seed,
}


def max_eigenvalue(normal: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], seed: int = 0,
                   iterations: int = _POWER_ITERATIONS) -> float:
    """Largest eigenvalue of a Hermitian positive semi-definite operator by the power method.

    Maths: ``x ← N x / ‖N x‖`` from a seeded complex Gaussian ``x₀``; returns ``‖N x‖`` of the
    last step (sigpy's ``PowerMethod``, but with ``numpy.random.default_rng(seed)`` in place of
    the global random state).

    Shape: ``normal`` maps complex64 arrays of ``shape`` to ``shape``; returns a Python float.
    """
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    x /= np.linalg.norm(x)
    eig = 0.0
    for _ in range(int(iterations)):
        y = normal(x)
        eig = float(np.linalg.norm(y))
        if eig == 0.0:
            return 0.0
        x = (y / eig).astype(np.complex64)
    return eig


def _sigpy_inputs(sample: Sample, sens_maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, maps, weights)`` as numpy for sigpy's apps: ``(C, H, W)``, ``(C, H, W)``, ``(H, W)``."""
    y = sample.kspace.detach().cpu().numpy().astype(np.complex64)
    maps = sens_maps.detach().cpu().numpy().astype(np.complex64)
    weights = sample.mask.detach().cpu().numpy().astype(np.float32)
    return y, maps, weights


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def zero_filled(sample: Sample, sens_maps: torch.Tensor) -> Reconstruction:
    """Zero-filled SENSE-combined adjoint.

    Maths: ``x = Aᴴ y = Σ_c conj(Ŝ_c) ifft2c(M ⊙ y_c)``, ``Ŝ_c = S_c / sqrt(Σ_c' |S_c'|²)``
    (``Ŝ = 0`` where every map is zero); single coil with a map of ones: ``ifft2c(y)``.

    Shape: ``sample.kspace`` ``(C, H, W)``; ``sens_maps`` ``(C, H, W)`` complex64; image ``(H, W)``.
    """
    start = time.perf_counter()
    maps = sens_maps.to(torch.complex64)
    norm = torch.linalg.vector_norm(maps, dim=0, keepdim=True)
    maps = torch.where(norm > 0, maps / norm.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(maps))
    op, y = _sense_operator(sample, maps)
    image = op.A_adjoint(y)[0, 0].cpu()
    return Reconstruction(image=image, seconds=time.perf_counter() - start, params={})


def sense(sample: Sample, sens_maps: torch.Tensor, lam: float = 1e-3, max_iter: int = 30,
          tol: float = 1e-6) -> Reconstruction:
    """SENSE-L2: Tikhonov-regularised least squares by conjugate gradient.

    Maths: ``x = argmin ‖A x − y‖² + λ‖x‖² = (AᴴA + λI)⁻¹ Aᴴ y``, CG from ``x₀ = 0`` for at
    most ``max_iter`` iterations or until ``‖r‖/‖Aᴴy‖ ≤ tol``. ``λ`` is on the normalised scale,
    where ``λ_max(AᴴA) ≈ 1`` for unit-norm maps, so the default ``1e-3`` is a small relative
    damping (it also keeps the system regular where ESPIRiT maps are zero).

    Shape: ``sample.kspace`` ``(C, H, W)``; ``sens_maps`` ``(C, H, W)`` complex64; image ``(H, W)``.
    """
    lam = _check_lam(lam, "sense")
    max_iter = _check_iterations(max_iter, "sense")
    tol = _check_tol(tol, "sense")
    start = time.perf_counter()
    op, y = _sense_operator(sample, sens_maps)
    result = conjugate_gradient(op.normal, op.A_adjoint(y), lam=lam, max_iter=max_iter, tol=tol)
    image = result.x[0, 0].cpu()
    params = {"lam": lam, "max_iter": max_iter, "tol": tol, "iterations": int(result.iterations)}
    return Reconstruction(image=image, seconds=time.perf_counter() - start, params=params)


def l1_wavelet(sample: Sample, sens_maps: torch.Tensor, lam: float = 3e-3, max_iter: int = 100,
               step: float | None = None, seed: int = 0) -> Reconstruction:
    """L1-wavelet compressed sensing by ``sigpy.mri.app.L1WaveletRecon`` (FISTA).

    Maths: ``x = argmin ½‖A x − y‖² + λ‖Ψ x‖₁``, ``Ψ`` the orthogonal db4 wavelet transform;
    step ``α = 1 / λ_max(AᴴA)`` (seeded power method) unless ``step`` is given.

    Shape: ``sample.kspace`` ``(C, H, W)``; ``sens_maps`` ``(C, H, W)`` complex64; image ``(H, W)``.
    """
    import sigpy.mri.app as mri_app
    import sigpy.mri.linop as mri_linop

    lam = _check_lam(lam, "l1wavelet")
    max_iter = _check_iterations(max_iter, "l1wavelet")
    step = _check_step(step, "l1wavelet")
    seed = _check_seed(seed, "l1wavelet")
    start = time.perf_counter()
    y, maps, weights = _sigpy_inputs(sample, sens_maps)
    if step is None:
        op = mri_linop.Sense(maps, weights=weights)
        eig = max_eigenvalue(op.N, tuple(op.ishape), seed)
        step = 1.0 if eig == 0 else 1.0 / eig
    app = mri_app.L1WaveletRecon(y, maps, lam, weights=weights, max_iter=max_iter, alpha=step, show_pbar=False)
    image = torch.from_numpy(np.asarray(app.run(), dtype=np.complex64))
    params = {"lam": lam, "max_iter": max_iter, "step": float(step), "seed": int(seed)}
    return Reconstruction(image=image, seconds=time.perf_counter() - start, params=params)


def total_variation(sample: Sample, sens_maps: torch.Tensor, lam: float = 3e-3, max_iter: int = 200,
                    step: float | None = None, seed: int = 0) -> Reconstruction:
    """Total-variation compressed sensing by ``sigpy.mri.app.TotalVariationRecon`` (PDHG).

    Maths: ``x = argmin ½‖A x − y‖² + λ‖∇x‖₁`` (anisotropic, circular differences), primal-dual
    on ``K = [A; ∇]`` with balanced steps ``τ = σ = 1 / sqrt(λ_max(KᴴK))`` (seeded power method)
    unless ``step`` is given (then ``τ = σ = step``). sigpy's own default ``σ = 1,
    τ = 1/λ_max`` satisfies the same ``τσ‖K‖² ≤ 1`` but needs several times more iterations for
    the same PSNR on the simulated sites.

    Shape: ``sample.kspace`` ``(C, H, W)``; ``sens_maps`` ``(C, H, W)`` complex64; image ``(H, W)``.
    """
    import sigpy.linop as linop
    import sigpy.mri.app as mri_app
    import sigpy.mri.linop as mri_linop

    lam = _check_lam(lam, "tv")
    max_iter = _check_iterations(max_iter, "tv")
    step = _check_step(step, "tv")
    seed = _check_seed(seed, "tv")
    start = time.perf_counter()
    y, maps, weights = _sigpy_inputs(sample, sens_maps)
    if step is None:
        op = mri_linop.Sense(maps, weights=weights)
        stacked = linop.Vstack([op, linop.FiniteDifference(op.ishape)])
        eig = max_eigenvalue(stacked.N, tuple(op.ishape), seed)
        step = 1.0 if eig == 0 else 1.0 / math.sqrt(eig)
    app = mri_app.TotalVariationRecon(y, maps, lam, weights=weights, max_iter=max_iter, tau=step, sigma=step,
                                      show_pbar=False)
    image = torch.from_numpy(np.asarray(app.run(), dtype=np.complex64))
    params = {"lam": lam, "max_iter": max_iter, "step": float(step), "seed": int(seed)}
    return Reconstruction(image=image, seconds=time.perf_counter() - start, params=params)


def unadapted(sample: Sample, sens_maps: torch.Tensor, prior: Any = None, lam: float = 0.01, num_steps: int = 20,
              seed: int = 0) -> Reconstruction:
    """The pre-trained prior without adaptation, fixed λ: the x-step chain of :mod:`recon.biasrecon`.

    Maths: along ``s_0 > … > s_N``: ``x̂ = D(x, s_i)``, ``x₀ = (AᴴA + λI)⁻¹(Aᴴy + λx̂)``, renoise.
    Shape: as :func:`run_baseline`; ``prior`` any object with ``denoise(x, sigma)``.
    """
    return _prior_method(sample, sens_maps, prior, lam, num_steps, seed, sure=False)


def unadapted_sure(sample: Sample, sens_maps: torch.Tensor, prior: Any = None, lam: float = 0.01,
                   num_steps: int = 20, seed: int = 0) -> Reconstruction:
    """The pre-trained prior without adaptation, the final λ chosen by SURE (BiasRecon without calibration).

    Maths: as :func:`unadapted`, then λ of the last data consistency minimising Monte-Carlo SURE
    (:meth:`recon.biasrecon.BiasRecon.lambda_step`), σ estimated from the k-space.
    Shape: as :func:`run_baseline`.
    """
    return _prior_method(sample, sens_maps, prior, lam, num_steps, seed, sure=True)


def _prior_method(sample: Sample, sens_maps: torch.Tensor, prior: Any, lam: float, num_steps: int, seed: int,
                  sure: bool) -> Reconstruction:
    if prior is None or not callable(getattr(prior, "denoise", None)):
        raise InputError("unadapted: key 'prior' must be an object with denoise(x, sigma), got none.")
    _check_lam(lam, "unadapted")
    op = Sense(sens_maps[None], sample.mask)
    settings = BiasReconSettings(num_steps=int(num_steps), adapt="none", sure=sure, lam=float(lam), seed=int(seed))
    start = time.perf_counter()
    result = BiasRecon(prior, op, sample.kspace[None], settings).run()
    return Reconstruction(image=result.image[0, 0], seconds=time.perf_counter() - start,
                          params={"lam": result.lam, "num_steps": num_steps, "sure": sure})


Method = Callable[..., Reconstruction]

METHODS: dict[str, Method] = {
    "zero_filled": zero_filled,
    "sense": sense,
    "l1wavelet": l1_wavelet,
    "tv": total_variation,
    "unadapted": unadapted,
    "unadapted_sure": unadapted_sure,
}
"""Registry ``name → method``; every method is ``(sample, sens_maps, **params) -> Reconstruction``."""

PRIOR_METHODS: tuple[str, ...] = ("unadapted", "unadapted_sure")
"""Methods that need ``prior=`` (a denoiser; scripts load it, recon never imports scores)."""

CLASSICAL_METHODS: tuple[str, ...] = ("zero_filled", "sense", "l1wavelet", "tv")
"""The methods that need no prior (what ``--method all`` runs)."""

TUNABLE_METHODS: tuple[str, ...] = ("l1wavelet", "tv")
"""Methods whose ``lam`` :func:`tune_lambda` searches."""

DEFAULT_LAMBDA_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
"""λ grid for the tunable methods, on the normalised scale (P99 of the low-resolution image = 1)."""


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
        sens_maps: Coil sensitivities (:func:`sensitivity_maps`).
        **params: The method's parameters (``lam``, ``max_iter``, ...).

    Returns:
        The reconstruction, its timing and the parameters used.

    Raises:
        InputError: unknown method or parameter, maps of the wrong shape, invalid values.
    """
    if method not in METHODS:
        raise InputError(f"method: key 'method' is {method!r}, expected one of {', '.join(METHODS)}.")
    if not isinstance(sample, Sample):
        raise InputError(f"{method}: key 'sample' must be a recon.data.Sample, got {type(sample).__name__}.")
    maps = _check_maps(sample, sens_maps)
    check_params(method, params)
    return METHODS[method](sample, maps, **params)


def check_params(method: str, params: dict[str, Any]) -> None:
    """Check a method's parameters before any data are read: known names, valid values.

    Maths: none. Shape: none. Values of the common parameters (``lam``, ``max_iter``, ``step``,
    ``tol``, ``seed``) are checked here; a method checks any others itself when called.

    Raises:
        InputError: unknown method or parameter name, or an invalid value.
    """
    allowed = method_parameters(method)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(
            f"{method}: parameter key '{unknown[0]}' is unknown, expected one of {', '.join(allowed) or '(none)'}."
        )
    for name, value in params.items():
        if name in _PARAMETER_CHECKS:
            _PARAMETER_CHECKS[name](value, method)


def method_parameters(method: str) -> tuple[str, ...]:
    """Names of a registered method's parameters (its keyword arguments after ``sample, sens_maps``).

    Maths: none. Shape: none.

    Raises:
        InputError: unknown method.
    """
    if method not in METHODS:
        raise InputError(f"method: key 'method' is {method!r}, expected one of {', '.join(METHODS)}.")
    return tuple(list(inspect.signature(METHODS[method]).parameters)[2:])


# --------------------------------------------------------------------------------------------
# sensitivity maps and cropping
# --------------------------------------------------------------------------------------------


def acs_width(mask: torch.Tensor, limit: int = _MAX_CALIB_WIDTH) -> int:
    """Side of the largest fully sampled central square of a mask, at most ``limit``.

    Maths: largest ``c ≤ limit`` with ``M[h₀:h₀+c, w₀:w₀+c] = 1``, ``h₀ = H//2 − c//2``,
    ``w₀ = W//2 − c//2`` (the block sigpy's ``EspiritCalib`` crops); 0 if none.

    Shape: ``mask`` ``(H, W)``; returns an int.
    """
    height, width = mask.shape[-2:]
    sampled = mask.reshape(-1, height, width)[0] != 0
    for c in range(min(int(limit), height, width), 0, -1):
        h0, w0 = height // 2 - c // 2, width // 2 - c // 2
        if bool(sampled[h0:h0 + c, w0:w0 + c].all()):
            return c
    return 0


def sensitivity_maps(sample: Sample, oracle: bool = False, max_calib_width: int = _MAX_CALIB_WIDTH,
                     crop: float = ESPIRIT_CROP) -> torch.Tensor:
    """Coil sensitivities of a slice, shared by every method.

    Maths: ESPIRiT (:func:`recon.coils.espirit_maps`) on the sample's fully sampled centre of
    side :func:`acs_width` (≤ ``max_calib_width``), maps zeroed where the ESPIRiT eigenvalue is
    below ``crop``; single-coil data get a map of ones; ``oracle=True`` returns the sample's
    stored true maps (simulated sites), an upper bound that real data do not have.

    The crop is low (:data:`ESPIRIT_CROP`) because small calibration regions (8-12 lines, e.g.
    8 % of 96-128 columns) give eigenvalues well below 1 inside the object: sigpy's 0.95 then
    zeroes the maps over parts of the anatomy and SENSE-type solves diverge there.

    Shape: returns ``(C, H, W)`` complex64.

    Raises:
        InputError: ``oracle`` without stored maps, or a centre too small for ESPIRiT.
    """
    source = f"{sample.fname} (slice {sample.slice_idx})"
    if oracle:
        if sample.sens_maps is None:
            raise InputError(f"{source}: key 'sens_maps' is missing, expected true maps in the file for oracle maps.")
        return sample.sens_maps
    if sample.kspace.shape[0] == 1:
        return torch.ones_like(sample.kspace)
    width = acs_width(sample.mask, max_calib_width)
    if width < _MIN_CALIB_WIDTH:
        raise InputError(
            f"{source}: key 'mask' has a fully sampled centre of {width} x {width}, expected at least "
            f"{_MIN_CALIB_WIDTH} x {_MIN_CALIB_WIDTH} for ESPIRiT "
            f"(raise acquisition.center_fraction or use oracle maps)."
        )
    return espirit_maps(sample.kspace, calib_width=width, crop=float(crop))


def center_crop(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Central crop of the last two dims, fastMRI's placement (``fastmri.data.transforms.center_crop``).

    Maths: ``x[..., h₀:h₀+h, w₀:w₀+w]``, ``h₀ = (H − h)//2``, ``w₀ = (W − w)//2``.

    Shape: ``(..., H, W)`` → ``(..., h, w)``; a dim that is not larger is left as it is.
    """
    height, width = image.shape[-2:]
    h, w = min(int(shape[0]), height), min(int(shape[1]), width)
    h0, w0 = (height - h) // 2, (width - w) // 2
    return image[..., h0:h0 + h, w0:w0 + w]


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
    """

    lam: float
    mean_psnr: float
    psnrs: tuple[float, ...]


def slice_psnr(sample: Sample, image: torch.Tensor) -> float:
    """PSNR of one reconstructed slice against the sample's target (fastMRI definition).

    Maths: ``psnr(t, center_crop(|x|))`` with ``maxval`` the file's volume maximum
    (``Sample.max_value``) when known, otherwise the slice target's maximum.

    Shape: ``image`` ``(H, W)``; target ``(h, w)``, ``h ≤ H``, ``w ≤ W``.
    """
    target = sample.target
    if target is None:
        raise InputError(
            f"{sample.fname} (slice {sample.slice_idx}): key 'target' is missing, expected a target image."
        )
    pred = center_crop(image.abs(), tuple(target.shape))
    target = center_crop(target, tuple(pred.shape))
    return psnr(target, pred, maxval=sample.max_value)


def tune_lambda(method: str, samples: Sequence[Sample], maps: Sequence[torch.Tensor],
                grid: Sequence[float] = DEFAULT_LAMBDA_GRID, **params: Any) -> tuple[float, list[LambdaScore]]:
    """Best λ of a method on a set of slices, chosen against their targets.

    Maths: ``λ* = argmax_{λ ∈ grid} mean_s PSNR(t_s, |x_s(λ)|)`` (:func:`slice_psnr`); ties go
    to the first grid point. This is the oracle "best-tuned" baseline: λ is chosen on the very
    slices it is evaluated on.

    Shape: ``samples[i].kspace`` ``(C, H, W)``, ``maps[i]`` of the same shape.

    Args:
        method: A method with a ``lam`` parameter (e.g. ``l1wavelet``, ``tv``).
        samples: Slices with targets.
        maps: Their sensitivity maps, in the same order.
        grid: Candidate λ values (non-negative).
        **params: Other parameters of the method (e.g. ``max_iter``), the same for every λ.

    Returns:
        ``(λ*, table)``: the best λ and one :class:`LambdaScore` per grid point, in grid order.

    Raises:
        InputError: a method without ``lam``, an empty or invalid grid, no samples, samples
            without targets, or maps not matching the samples.
    """
    if method not in METHODS:
        raise InputError(f"method: key 'method' is {method!r}, expected one of {', '.join(METHODS)}.")
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
    for sample in samples:
        if sample.target is None:
            raise InputError(
                f"{sample.fname} (slice {sample.slice_idx}): key 'target' is missing, expected targets to tune λ."
            )
    table = []
    for lam in grid:
        scores = tuple(
            slice_psnr(sample, run_baseline(method, sample, m, lam=lam, **params).image)
            for sample, m in zip(samples, maps)
        )
        table.append(LambdaScore(lam=lam, mean_psnr=float(np.mean(scores)), psnrs=scores))
    best = max(range(len(table)), key=lambda i: (table[i].mean_psnr, -i))
    return table[best].lam, table
