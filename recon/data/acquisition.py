"""Simulated receive chain: birdcage coil sensitivities and (correlated) thermal noise.

Coil maps come from :func:`sigpy.mri.birdcage_maps`, computed on a square grid large enough to
hold the rotated field of view and resampled onto the rotated ``(H, W)`` grid, then normalised
to ``Σ_c |S_c|² = 1`` at every pixel (so the RSS of noiseless coil images is the image magnitude).
Noise is circularly-symmetric complex Gaussian, ``n = L z``, ``L Lᴴ = σ² Ψ``,
``Ψ_ij = ρ^{d(i, j)}`` with ``d`` the distance between coils around the ring.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from recon.errors import InputError

__all__ = ["MIN_RADIUS", "birdcage_sens_maps", "coil_noise_covariance", "complex_noise"]

MIN_RADIUS = 1.5
"""Smallest birdcage radius (relative to the half field of view): coils stay outside the rotated
field of view, so the maps are finite everywhere."""


def birdcage_sens_maps(count: int, matrix: tuple[int, int], radius: float, rotation_deg: float) -> np.ndarray:
    """Birdcage coil sensitivities of a given radius and rotation.

    Maths: ``S_c(p) = B_c(R_θ p) / sqrt(Σ_c' |B_c'(R_θ p)|²)``, ``B`` sigpy's birdcage maps with
    the ring radius relative to half of ``max(H, W)``.

    Shape: returns ``(count, H, W)`` complex64 for ``matrix = (H, W)``.

    Raises:
        InputError: ``count < 1`` or ``radius < MIN_RADIUS``.
    """
    height, width = (int(s) for s in matrix)
    if count < 1:
        raise InputError(f"coils.count: key 'coils.count' must be a positive integer, got {count}.")
    if not radius >= MIN_RADIUS:
        raise InputError(f"coils.radius: key 'coils.radius' must be >= {MIN_RADIUS} (coils outside the field of view), got {radius}.")
    import sigpy.mri  # heavy import (numba), only when maps are simulated

    side = max(height, width)
    grid = 2 * math.ceil((math.sqrt(height**2 + width**2) + 4) / 2)
    maps = sigpy.mri.birdcage_maps((count, grid, grid), r=radius * side / grid, dtype=np.complex128)
    theta = math.radians(rotation_deg)
    r = np.arange(height) - height / 2
    c = np.arange(width) - width / 2
    rr, cc = np.meshgrid(r, c, indexing="ij")
    src_r = math.cos(theta) * rr - math.sin(theta) * cc + grid / 2
    src_c = math.sin(theta) * rr + math.cos(theta) * cc + grid / 2
    coords = np.stack([src_r, src_c])
    out = np.empty((count, height, width), dtype=np.complex128)
    for i in range(count):
        out[i].real = ndimage.map_coordinates(maps[i].real, coords, order=3, mode="nearest")
        out[i].imag = ndimage.map_coordinates(maps[i].imag, coords, order=3, mode="nearest")
    out /= np.sqrt(np.sum(np.abs(out) ** 2, axis=0, keepdims=True))
    return out.astype(np.complex64)


def coil_noise_covariance(count: int, correlation: float) -> np.ndarray:
    """Noise covariance of a ring of coils with neighbour correlation ``ρ``.

    Maths: ``Ψ_ij = ρ^{min(|i − j|, C − |i − j|)}``, unit diagonal.

    Shape: returns ``(C, C)`` float64, symmetric positive definite.

    Raises:
        InputError: ``ρ`` outside ``[0, 0.9]``.
    """
    if not 0.0 <= correlation <= 0.9:
        raise InputError(f"coils.correlation: key 'coils.correlation' must be in [0, 0.9], got {correlation}.")
    i = np.arange(count)
    d = np.abs(i[:, None] - i[None, :])
    d = np.minimum(d, count - d)
    return np.where(d == 0, 1.0, correlation ** d.astype(np.float64))


def complex_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, covariance: np.ndarray) -> np.ndarray:
    """Complex Gaussian noise, correlated across the coil axis.

    Maths: ``n = L z``, ``z ~ CN(0, I)`` (real and imaginary parts ``N(0, ½)``), ``L Lᴴ = σ² Ψ``;
    so ``E|n_c|² = σ²``.

    Shape: ``shape = (..., C, H, W)`` with ``C = covariance.shape[0]``; returns complex64.
    """
    coils = covariance.shape[0]
    if shape[-3] != coils:
        raise InputError(f"noise: key 'coils.count' gives {coils} coils, but the k-space shape is {shape}.")
    z = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / math.sqrt(2.0)
    chol = np.linalg.cholesky(covariance) * sigma
    n = np.einsum("ij,...jhw->...ihw", chol, z)
    return n.astype(np.complex64)
