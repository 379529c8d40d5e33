"""Classical reconstruction methods: zero-filled, SENSE-L2, L1-wavelet and TV.

Every method is a function ``(sample, sens_maps, **params) -> Reconstruction``; the method table
(:mod:`recon.methods`) registers them next to the prior-based methods and runs them by name.

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
maps are estimated once per slice (:func:`recon.coils.sensitivity_maps`) and shared by every method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recon.data.sample import Sample
from recon.errors import InputError
from recon.operators import Sense, conjugate_gradient

__all__ = [
    "Reconstruction",
    "PARAMETER_CHECKS",
    "zero_filled",
    "sense",
    "l1_wavelet",
    "total_variation",
    "max_eigenvalue",
]

_POWER_ITERATIONS = 30  # sigpy's default max_power_iter


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
# parameter checks and helpers
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


PARAMETER_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    # the common parameters of the classical methods: name → check(value, method) → the value
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
