"""Seeded Cartesian sampling masks and user-mask validation.

A mask is a ``torch.float32`` tensor of zeros and ones of shape ``(H, W)``, broadcastable to
k-space ``(batch, coils, H, W)``. One-dimensional (1-D) masks select phase-encode columns (the
last dimension ``W``, as in fastMRI) and are constant along ``H``. The acceleration a mask
achieves is ``H * W / mask.sum()``.

Every generator has the signature
``(shape, acceleration, center_fraction, seed) -> (mask, achieved_acceleration)``, draws its
randomness only from ``seed`` (the same seed gives the same mask; no global state is changed),
keeps a fully sampled centre (:func:`center_box`) and lands within
:data:`ACCELERATION_TOLERANCE` (10 %) of the requested acceleration whenever the grid allows it.

* ``random_1d`` / ``equispaced_1d``: fastMRI's ``RandomMaskFunc`` / ``EquispacedMaskFractionFunc``
  called with ``seed=seed`` (bit-identical to fastMRI). fastMRI only matches the acceleration in
  expectation, so when a draw misses the tolerance the draw is repeated with the fastMRI seeds
  ``(seed, 1), (seed, 2), ...`` (see :func:`retry_seeds`) until one lands inside it.
* ``gaussian_1d``: ``round(W / acceleration)`` columns in all, the central ones fully sampled and
  the rest drawn without replacement with a Gaussian density centred on the k-space centre.
* ``gaussian_2d``: likewise per pixel, with a separable 2-D Gaussian density and a fully sampled
  central box.
* ``poisson_2d``: ``sigpy.mri.poisson`` variable-density Poisson disc with a calibration box,
  re-requested with a corrected acceleration (and, if sigpy gives up, derived seeds) until the
  achieved acceleration lands within tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from recon.errors import InputError

__all__ = [
    "ACCELERATION_TOLERANCE",
    "GAUSSIAN_STD_FRACTION",
    "MASK_TYPES",
    "acceleration_of",
    "as_kspace_mask",
    "center_box",
    "equispaced_1d",
    "gaussian_1d",
    "gaussian_2d",
    "make_mask",
    "poisson_2d",
    "random_1d",
    "retry_seeds",
]

MASK_TYPES: tuple[str, ...] = ("random_1d", "equispaced_1d", "gaussian_1d", "gaussian_2d", "poisson_2d")

ACCELERATION_TOLERANCE: float = 0.10
"""Largest relative gap ``|achieved - requested| / requested`` a generated mask aims for."""

GAUSSIAN_STD_FRACTION: float = 0.2
"""Standard deviation of the Gaussian sampling density, as a fraction of each k-space dimension."""

_MAX_DRAWS = 200  # fastMRI redraws before giving up on the tolerance and keeping the closest draw
_MAX_POISSON_CALLS = 12

MaskGenerator = Callable[[tuple[int, int], float, float, int], tuple[torch.Tensor, float]]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _relative_gap(achieved: float, requested: float) -> float:
    return abs(achieved - requested) / requested


def _central_range(n: int, num_center: int) -> slice:
    """Indices of the ``num_center`` central entries of an axis of length ``n`` (fastMRI's placement)."""
    pad = (n - num_center + 1) // 2
    return slice(pad, pad + num_center)


def _check_request(
    shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int, name: str
) -> tuple[int, int]:
    """Validate the common arguments of every mask generator; returns ``(H, W)``."""
    try:
        height, width = (int(s) for s in shape)
        ok = len(tuple(shape)) == 2 and height == shape[0] and width == shape[1]
    except (TypeError, ValueError):
        ok = False
    if not ok or height < 2 or width < 2:
        raise InputError(f"{name}: shape must be two integers (H, W), each at least 2, got {shape!r}.")
    if isinstance(acceleration, bool) or not isinstance(acceleration, (int, float, np.number)):
        raise InputError(f"{name}: acceleration must be a number greater than 1, got {acceleration!r}.")
    if not math.isfinite(acceleration) or acceleration <= 1:
        raise InputError(f"{name}: acceleration must be a finite number greater than 1, got {acceleration!r}.")
    if isinstance(center_fraction, bool) or not isinstance(center_fraction, (int, float, np.number)):
        raise InputError(f"{name}: center_fraction must be a number in [0, 1), got {center_fraction!r}.")
    if not 0 <= center_fraction < 1:
        raise InputError(f"{name}: center_fraction must be a number in [0, 1), got {center_fraction!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"{name}: seed must be an integer in [0, 2**32), got {seed!r}.")
    return height, width


def _check_center_fits(
    name: str, num_center: int, num_total: float, acceleration: float, center_fraction: float,
    lines_left: bool = False,
) -> None:
    """The centre fits the budget ``num_total``; with ``lines_left`` it must leave some line to draw (fastMRI's
    1-D mask functions divide by ``num_total − num_center``)."""
    if num_center > num_total or (lines_left and num_center >= num_total):
        raise InputError(
            f"{name}: center_fraction={center_fraction} fully samples {num_center} k-space locations, "
            f"{'at least' if lines_left else 'more than'} the {num_total:g} that acceleration={acceleration} "
            f"allows; expected a smaller center_fraction or a lower acceleration."
        )


def retry_seeds(seed: int) -> Iterator[int | tuple[int, int]]:
    """The fastMRI seeds tried in turn by ``random_1d`` and ``equispaced_1d``.

    Maths: ``seed, (seed, 1), (seed, 2), ...``; fastMRI's ``MaskFunc.__call__`` accepts both.

    Args:
        seed: The user's seed.

    Yields:
        ``seed`` first, then ``(seed, k)`` for ``k = 1, 2, ...`` (at most 200 values in all).
    """
    yield int(seed)
    for k in range(1, _MAX_DRAWS):
        yield (int(seed), k)


def _fastmri_1d(
    mask_func_cls: type, name: str, shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """A fastMRI column mask, redrawn along :func:`retry_seeds` until within tolerance."""
    height, width = _check_request(shape, acceleration, center_fraction, seed, name)
    _check_center_fits(name, round(width * center_fraction), width / acceleration, acceleration, center_fraction,
                       lines_left=True)
    mask_func = mask_func_cls(center_fractions=[center_fraction], accelerations=[acceleration])
    best_row, best_gap = None, math.inf
    for draw_seed in retry_seeds(seed):
        # fastMRI's mask functions take k-space shaped (..., H, W, 2) and mask shape[-2] = W.
        row, _ = mask_func((1, height, width, 2), seed=draw_seed)
        row = row.reshape(width)
        gap = _relative_gap(width / float(row.sum()), acceleration) if row.sum() > 0 else math.inf
        if gap < best_gap:
            best_row, best_gap = row, gap
        if gap <= ACCELERATION_TOLERANCE:
            break
    mask = best_row.to(torch.float32).expand(height, width).contiguous()
    return mask, acceleration_of(mask)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def center_box(shape: tuple[int, int], fraction: float) -> torch.Tensor:
    """Central box of k-space, e.g. the auto-calibration (ACS) region.

    Maths: ``box[i, j] = 1`` iff row ``i`` is among the ``round(H * fraction)`` central rows and
    column ``j`` among the ``round(W * fraction)`` central columns (fastMRI's centre placement).

    Shape: returns ``(H, W)`` float32 of 0/1.

    Args:
        shape: ``(H, W)``.
        fraction: Side of the box as a fraction of each dimension, in ``[0, 1]``.

    Returns:
        The 0/1 box mask; all zeros when ``fraction`` rounds to zero lines.
    """
    try:
        height, width = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"center_box: shape must be two integers (H, W), got {shape!r}.") from None
    if height < 1 or width < 1:
        raise InputError(f"center_box: shape must be two positive integers (H, W), got {shape!r}.")
    if not 0 <= fraction <= 1:
        raise InputError(f"center_box: fraction must be a number in [0, 1], got {fraction!r}.")
    box = torch.zeros(height, width, dtype=torch.float32)
    box[_central_range(height, round(height * fraction)), _central_range(width, round(width * fraction))] = 1
    return box


def acceleration_of(mask: torch.Tensor) -> float:
    """Acceleration a 0/1 mask achieves.

    Maths: ``R = numel(mask) / sum(mask)`` (``inf`` for an all-zero mask).

    Shape: any; for a mask of shape ``(H, W)`` this is ``H * W / mask.sum()``.

    Args:
        mask: 0/1 mask (torch tensor or numpy array).

    Returns:
        The acceleration factor as a Python float.
    """
    mask = torch.as_tensor(mask)
    total = float(mask.to(torch.float64).sum())
    return math.inf if total == 0 else mask.numel() / total


def random_1d(
    shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """fastMRI random column mask (``fastmri.data.subsample.RandomMaskFunc``).

    Maths: ``round(W * center_fraction)`` central columns, every other column kept with
    probability ``(W / R - N_low) / (W - N_low)``; redrawn with :func:`retry_seeds` until
    ``|R_achieved - R| <= 0.1 R`` (the closest draw is kept if none of 200 does).

    Shape: returns ``(H, W)`` float32, constant along ``H``.

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: Requested acceleration ``R > 1``.
        center_fraction: Fraction of central columns fully sampled.
        seed: Seed; the mask equals ``RandomMaskFunc([center_fraction], [R])(shape, seed=s)`` for
            the first ``s`` of :func:`retry_seeds` that lands in tolerance.

    Returns:
        ``(mask, achieved_acceleration)``.
    """
    from fastmri.data.subsample import RandomMaskFunc

    return _fastmri_1d(RandomMaskFunc, "random_1d", shape, acceleration, center_fraction, seed)


def equispaced_1d(
    shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """fastMRI equispaced column mask (``fastmri.data.subsample.EquispacedMaskFractionFunc``).

    Maths: ``round(W * center_fraction)`` central columns plus columns at a spacing adjusted so
    that about ``W / R`` columns are sampled, from a seeded random offset; redrawn with
    :func:`retry_seeds` until ``|R_achieved - R| <= 0.1 R``.

    Shape: returns ``(H, W)`` float32, constant along ``H``.

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: Requested acceleration ``R > 1``.
        center_fraction: Fraction of central columns fully sampled.
        seed: Seed, passed to fastMRI as in :func:`random_1d`.

    Returns:
        ``(mask, achieved_acceleration)``.
    """
    from fastmri.data.subsample import EquispacedMaskFractionFunc

    return _fastmri_1d(EquispacedMaskFractionFunc, "equispaced_1d", shape, acceleration, center_fraction, seed)


def _gaussian_density(n: int) -> np.ndarray:
    """Gaussian weights over the ``n`` indices of one axis, centred on the k-space centre ``n // 2``."""
    k = np.arange(n) - n // 2
    return np.exp(-0.5 * (k / (GAUSSIAN_STD_FRACTION * n)) ** 2)


def gaussian_1d(
    shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """Variable-density random columns with a Gaussian density.

    Maths: ``N = round(W / R)`` columns: the ``round(W * center_fraction)`` central ones, the rest
    drawn without replacement with ``p(k) ∝ exp(-k² / (2 (0.2 W)²))``, ``k`` the offset from the
    centre column ``W // 2``.

    Shape: returns ``(H, W)`` float32, constant along ``H``.

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: Requested acceleration ``R > 1``.
        center_fraction: Fraction of central columns fully sampled.
        seed: Seed of the ``numpy.random.Generator`` that draws the columns.

    Returns:
        ``(mask, achieved_acceleration)``; achieved is ``W / round(W / R)``.
    """
    height, width = _check_request(shape, acceleration, center_fraction, seed, "gaussian_1d")
    num_total = max(1, round(width / acceleration))
    center = np.zeros(width, dtype=bool)
    center[_central_range(width, round(width * center_fraction))] = True
    _check_center_fits("gaussian_1d", int(center.sum()), num_total, acceleration, center_fraction)
    row = center.copy()
    candidates = np.flatnonzero(~center)
    weights = _gaussian_density(width)[candidates]
    rng = np.random.default_rng(seed)
    picked = rng.choice(candidates, size=num_total - int(center.sum()), replace=False, p=weights / weights.sum())
    row[picked] = True
    mask = torch.from_numpy(row.astype(np.float32)).expand(height, width).contiguous()
    return mask, acceleration_of(mask)


def gaussian_2d(
    shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """Variable-density random pixels with a separable 2-D Gaussian density.

    Maths: ``N = round(H W / R)`` pixels: the central box (side ``center_fraction`` of each
    dimension), the rest drawn without replacement with
    ``p(ky, kx) ∝ exp(-ky² / (2 (0.2 H)²) - kx² / (2 (0.2 W)²))``.

    Shape: returns ``(H, W)`` float32.

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: Requested acceleration ``R > 1``.
        center_fraction: Side of the fully sampled central box, as a fraction of each dimension.
        seed: Seed of the ``numpy.random.Generator`` that draws the pixels.

    Returns:
        ``(mask, achieved_acceleration)``; achieved is ``H W / round(H W / R)``.
    """
    height, width = _check_request(shape, acceleration, center_fraction, seed, "gaussian_2d")
    num_total = max(1, round(height * width / acceleration))
    center = center_box((height, width), center_fraction).numpy().astype(bool).ravel()
    _check_center_fits("gaussian_2d", int(center.sum()), num_total, acceleration, center_fraction)
    flat = center.copy()
    candidates = np.flatnonzero(~center)
    weights = np.outer(_gaussian_density(height), _gaussian_density(width)).ravel()[candidates]
    rng = np.random.default_rng(seed)
    picked = rng.choice(candidates, size=num_total - int(center.sum()), replace=False, p=weights / weights.sum())
    flat[picked] = True
    mask = torch.from_numpy(flat.reshape(height, width).astype(np.float32))
    return mask, acceleration_of(mask)


def poisson_2d(
    shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """Variable-density Poisson-disc mask (``sigpy.mri.poisson``) with a calibration box.

    Maths: sigpy's Poisson disc with density ``∝ 1 / (1 + s |r|)`` and calibration box
    ``(round(H c), round(W c))``, ``c = center_fraction``, united with :func:`center_box`; the
    acceleration asked of sigpy is corrected by ``R / R_achieved`` and the call repeated until
    ``|R_achieved - R| <= 0.1 R``. If sigpy cannot meet a request, the next try uses a seed
    derived from ``(seed, attempt)``.

    Shape: returns ``(H, W)`` float32.

    Args:
        shape: ``(H, W)`` of k-space.
        acceleration: Requested acceleration ``R > 1``.
        center_fraction: Side of the fully sampled central box, as a fraction of each dimension.
        seed: Seed passed to sigpy (sigpy restores numpy's global random state afterwards).

    Returns:
        ``(mask, achieved_acceleration)``.

    Raises:
        InputError: if no attempt lands within tolerance (e.g. a tiny grid with a large box).
    """
    import sigpy.mri

    height, width = _check_request(shape, acceleration, center_fraction, seed, "poisson_2d")
    box = center_box((height, width), center_fraction).numpy()
    _check_center_fits("poisson_2d", int(box.sum()), height * width / acceleration, acceleration, center_fraction)
    calib = (round(height * center_fraction), round(width * center_fraction))
    request, attempt, sigpy_seed = float(acceleration), 0, int(seed)
    best, best_gap = None, math.inf
    for _ in range(_MAX_POISSON_CALLS):
        try:
            raw = sigpy.mri.poisson(
                (height, width),
                max(request, 1.0 + 1e-3),
                calib=calib,
                dtype=np.float32,
                seed=sigpy_seed,
                tol=0.25 * ACCELERATION_TOLERANCE * request,
            )
        except ValueError:  # sigpy's slope search could not meet the request for this seed
            attempt += 1
            sigpy_seed = int(np.random.SeedSequence([int(seed), attempt]).generate_state(1)[0])
            continue
        mask = np.maximum(raw.real.astype(np.float32), box)
        achieved = acceleration_of(torch.from_numpy(mask))
        gap = _relative_gap(achieved, acceleration)
        if gap < best_gap:
            best, best_gap = mask, gap
        if gap <= ACCELERATION_TOLERANCE:
            break
        request *= acceleration / achieved
    if best is None or best_gap > ACCELERATION_TOLERANCE:
        raise InputError(
            f"poisson_2d: could not reach acceleration={acceleration} within 10% on a {height}x{width} grid "
            f"with center_fraction={center_fraction}; expected a larger grid, a smaller center_fraction or "
            f"another acceleration."
        )
    mask = torch.from_numpy(best)
    return mask, acceleration_of(mask)


_GENERATORS: dict[str, MaskGenerator] = {
    "random_1d": random_1d,
    "equispaced_1d": equispaced_1d,
    "gaussian_1d": gaussian_1d,
    "gaussian_2d": gaussian_2d,
    "poisson_2d": poisson_2d,
}


def make_mask(
    mask_type: str, shape: tuple[int, int], acceleration: float, center_fraction: float, seed: int
) -> tuple[torch.Tensor, float]:
    """Seeded sampling mask of a named type.

    Maths: ``R_achieved = H W / sum(mask)``, within 10% of ``acceleration`` where the grid allows.

    Shape: returns ``(H, W)`` float32 of 0/1, broadcastable to k-space ``(B, C, H, W)``.

    Args:
        mask_type: One of :data:`MASK_TYPES`.
        shape: ``(H, W)`` of k-space.
        acceleration: Requested acceleration ``R > 1``.
        center_fraction: Fraction of each dimension (columns only for 1-D types) fully sampled.
        seed: Seed; the same seed gives the same mask.

    Returns:
        ``(mask, achieved_acceleration)``.

    Raises:
        InputError: unknown ``mask_type`` or invalid arguments.
    """
    generator = _GENERATORS.get(mask_type) if isinstance(mask_type, str) else None
    if generator is None:
        raise InputError(f"mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}.")
    return generator(shape, acceleration, center_fraction, seed)


def as_kspace_mask(
    mask: torch.Tensor | np.ndarray, kspace_shape: tuple[int, ...], source: str = "mask"
) -> torch.Tensor:
    """Validate a user-supplied mask and make it broadcastable to k-space.

    Maths: ``mask ∈ {0, 1}``; a column mask ``m[w]`` becomes ``M[h, w] = m[w]``.

    Shape: accepts ``(W,)``, ``(H, W)`` or exactly ``kspace_shape`` (``(C, H, W)`` or
    ``(B, C, H, W)``); returns float32 ``(H, W)`` for the first two, ``kspace_shape`` for the last.

    Args:
        mask: Torch tensor (device kept) or numpy array (returned on the CPU), boolean or numeric.
        kspace_shape: Shape of the k-space the mask applies to; its last two entries are ``(H, W)``.
        source: Where the mask came from (a file and key, an argument name), used in error messages.

    Returns:
        The float32 0/1 mask.

    Raises:
        InputError: wrong shape, non-finite or non-0/1 values, or no sampled location.
    """
    kspace_shape = tuple(int(s) for s in kspace_shape)
    if len(kspace_shape) < 2:
        raise InputError(f"{source}: k-space shape must have at least two dimensions (H, W), got {kspace_shape}.")
    height, width = kspace_shape[-2:]
    accepted = [(width,), (height, width)]
    if len(kspace_shape) > 2 and kspace_shape not in accepted:
        accepted.append(kspace_shape)
    accepted_text = ", ".join(str(s) for s in accepted[:-1]) + f" or {accepted[-1]}"

    if isinstance(mask, np.ndarray):
        if mask.dtype.kind not in "biufc":
            raise InputError(
                f"{source}: mask of shape {tuple(mask.shape)} has dtype {mask.dtype}, expected a boolean or "
                f"numeric array of shape {accepted_text}."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(mask))
    elif isinstance(mask, torch.Tensor):
        tensor = mask.detach()
    else:
        raise InputError(
            f"{source}: expected a torch tensor or numpy array of shape {accepted_text}, got {type(mask).__name__}."
        )

    given = tuple(tensor.shape)

    def fail(problem: str) -> InputError:
        return InputError(f"{source}: mask of shape {given} {problem}; expected 0/1 values of shape {accepted_text}.")

    if given not in accepted:
        raise fail(f"does not fit k-space of shape {kspace_shape}")
    if tensor.is_complex():
        if bool((tensor.imag != 0).any()):
            raise fail("has non-zero imaginary parts")
        tensor = tensor.real
    if tensor.dtype != torch.bool:
        if not bool(torch.isfinite(tensor).all()):
            raise fail("has non-finite values")
        if not bool(((tensor == 0) | (tensor == 1)).all()):
            raise fail("has values other than 0 and 1")
    tensor = tensor.to(torch.float32)
    if not bool(tensor.any()):
        raise fail("samples no k-space location (all zeros)")
    if given == (width,):
        tensor = tensor.expand(height, width)
    return tensor.contiguous()
