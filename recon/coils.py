"""Coil sensitivities (ESPIRiT through sigpy), the scan's fully sampled centre, and RSS coil combination.

Sensitivity maps have the shape of k-space, ``(coils, H, W)`` or ``(batch, coils, H, W)``,
``torch.complex64``. The SENSE combination ``sum_c conj(S_c) x_c`` is the adjoint of the Sense
operator and lives in :mod:`recon.operators`. The centre detector (:func:`detect_acs`) is the one
the maps (ESPIRiT's calibration block, :func:`acs_width`) and BiasRecon's Θ/Λ split both use.

A maths module: it imports only ``errors`` and ``masks``, and reads a slice through the small
:class:`MultiCoilSlice` protocol, so the data layer (``recon.data``, whose ``Sample`` fits the
protocol) may use it — :func:`rss` in the intensity normalisation — and not the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch

from recon.errors import InputError
from recon.fft import ifft2c
from recon.masks import center_box

__all__ = ["detect_acs", "acs_width", "acs_rectangle", "espirit_maps", "sensitivity_maps", "MultiCoilSlice",
           "ESPIRIT_CROP", "ESPIRIT_BLOCK", "MAP_BLOCKS", "rss"]

_ESPIRIT_KERNEL_WIDTH = 6  # sigpy's default calibration kernel width
_MIN_CALIB_WIDTH = 7  # espirit_maps needs calib_width > its kernel width 6
_MAX_CALIB_WIDTH = 24  # sigpy's default calibration width

ESPIRIT_CROP = 0.1
"""ESPIRiT eigenvalue crop of :func:`sensitivity_maps` (sigpy's default 0.95 fails on small ACS)."""

MAP_BLOCKS = ("square", "rectangle")
"""ESPIRiT's calibration block in :func:`sensitivity_maps`: the centre's largest square (sigpy's), or that square
extended along the rows that stay fully sampled (:func:`acs_rectangle`: every readout row of a 1-D mask)."""

ESPIRIT_BLOCK = "rectangle"
"""The default of :data:`MAP_BLOCKS` (``maps_block``): a 1-D mask's 8-11 centre columns give sigpy's square
only 3-6 kernel positions a side; every readout row explains the data better (docs/results/coil_maps.md)."""


def _largest_sampled(sampled: torch.Tensor, boxes: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The centre detector: the largest of nested central boxes (given smallest first) that the mask
    samples completely, or ``None``. Empty boxes are passed over; the scan stops at the first box
    with an unsampled entry (a larger box contains it).

    Shape: ``sampled`` ``(H, W)`` bool; each box ``(H, W)`` bool.
    """
    best = None
    for box in boxes:
        if not bool(box.any()):
            continue
        if not bool(sampled[box].all()):
            break
        best = box
    return best


def detect_acs(mask: torch.Tensor) -> torch.Tensor:
    """The fully sampled centre of a sampling mask (its auto-calibration region), as a 0/1 mask.

    Maths: for a mask constant along ``H`` (1-D Cartesian), the longest run of sampled columns that
    contains the centre column ``W // 2`` (all rows); otherwise the largest central box
    :func:`recon.masks.center_box` ``((H, W), k / max(H, W))`` that the mask samples completely.
    All zeros when the centre itself is not sampled.
    Shape: ``mask`` ``(H, W)`` of 0/1 (float or bool); returns ``(H, W)`` float32 on its device.

    Raises:
        InputError: a mask that is not a real ``(H, W)`` tensor.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_complex():
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"detect_acs: mask must be a real (H, W) tensor of 0/1, got {got}.")
    sampled = mask != 0
    height, width = int(mask.shape[0]), int(mask.shape[1])
    out = torch.zeros(height, width, dtype=torch.float32, device=mask.device)
    if bool(torch.equal(sampled, sampled[:1].expand_as(sampled))):  # 1-D Cartesian: a run of columns
        cols = sampled[0].tolist()
        centre = width // 2
        if not cols[centre]:
            return out
        lo, hi = centre, centre
        while lo > 0 and cols[lo - 1]:
            lo -= 1
        while hi < width - 1 and cols[hi + 1]:
            hi += 1
        out[:, lo : hi + 1] = 1
        return out
    side = max(height, width)
    boxes = (center_box((height, width), k / side).to(mask.device) != 0 for k in range(1, side + 1))
    best = _largest_sampled(sampled, boxes)
    return out if best is None else best.to(torch.float32)


def _espirit_square(height: int, width: int, side: int, device: torch.device) -> torch.Tensor:
    """The ``side × side`` block sigpy's ``EspiritCalib`` crops: rows from ``H//2 − side//2``, columns likewise."""
    box = torch.zeros(height, width, dtype=torch.bool, device=device)
    h0, w0 = height // 2 - side // 2, width // 2 - side // 2
    box[h0:h0 + side, w0:w0 + side] = True
    return box


def acs_width(mask: torch.Tensor, limit: int = _MAX_CALIB_WIDTH) -> int:
    """Side of the largest fully sampled central square of a mask, at most ``limit`` (ESPIRiT's block).

    Maths: largest ``c ≤ limit`` with ``M[h₀:h₀+c, w₀:w₀+c] = 1``, ``h₀ = H//2 − c//2``,
    ``w₀ = W//2 − c//2`` (the block sigpy's ``EspiritCalib`` crops), by the centre detector of
    :func:`detect_acs` on these squares; 0 if none.

    Shape: ``mask`` ``(H, W)`` (or with leading singleton dims); returns an int.
    """
    height, width = mask.shape[-2:]
    sampled = mask.reshape(-1, height, width)[0] != 0
    sides = range(1, min(int(limit), height, width) + 1)
    best = _largest_sampled(sampled, (_espirit_square(height, width, c, mask.device) for c in sides))
    return 0 if best is None else int(best.any(dim=0).sum())


def acs_rectangle(mask: torch.Tensor, max_columns: int = _MAX_CALIB_WIDTH) -> tuple[int, int]:
    """``(rows, columns)`` of the largest fully sampled central rectangle of a mask whose columns are those
    of :func:`acs_width`'s square (at most ``max_columns``), placed as :func:`espirit_maps` crops it.

    Maths: ``c = acs_width(M, max_columns)``; then the largest ``r ≤ H`` with
    ``M[H//2 − r//2 : H//2 − r//2 + r, W//2 − c//2 : W//2 − c//2 + c] = 1``. A 1-D mask gives ``(H, c)``
    (every readout row), a 2-D mask with a square centre ``(c, c)``; ``(0, 0)`` without a centre.
    Shape: ``mask`` ``(H, W)`` (or with leading singleton dims); returns two ints.
    """
    height, width = mask.shape[-2:]
    sampled = mask.reshape(-1, height, width)[0] != 0
    columns = acs_width(mask, max_columns)
    if columns == 0:
        return 0, 0
    c0 = width // 2 - columns // 2
    rows = columns
    while rows < height:
        r0 = height // 2 - (rows + 1) // 2
        if not bool(sampled[r0:r0 + rows + 1, c0:c0 + columns].all()):
            break
        rows += 1
    return rows, columns


def espirit_maps(
    kspace: torch.Tensor,
    calib_width: int | tuple[int, int] = 24,
    threshold: float = 0.02,
    crop: float = 0.95,
    max_iter: int = 100,
) -> torch.Tensor:
    """ESPIRiT coil sensitivity maps from the auto-calibration (ACS) centre of k-space.

    Maths: eigenvector of the ESPIRiT operator with eigenvalue ~1 at each pixel (Uecker et al.
    2014), from the central ``calib_width x calib_width`` block of k-space (or a ``(rows, columns)``
    rectangle); phase relative to coil 0, ``sum_c |S_c|² = 1`` where the eigenvalue exceeds ``crop``
    and ``S = 0`` elsewhere. A square is computed by ``sigpy.mri.app.EspiritCalib``, a rectangle by
    the same algorithm in torch (:func:`_espirit`; sigpy crops squares only); on the CPU, one batch
    item at a time.

    Shape: ``kspace`` ``(C, H, W)`` or ``(B, C, H, W)`` complex; returns the same shape,
    ``torch.complex64``, on ``kspace.device``.

    Args:
        kspace: Centered k-space (the orthonormal ``fft2c`` convention). Undersampled k-space is
            fine provided the central ``calib_width`` block is fully sampled: only it is used.
        calib_width: Side of the central calibration block, at most ``min(H, W)``; or its
            ``(rows, columns)``, e.g. every readout row × the ACS columns of a 1-D mask.
        threshold: Singular values below ``threshold * max`` of the calibration matrix are dropped.
        crop: Eigenvalue threshold below which maps are set to zero (outside the object).
        max_iter: Power-method iterations.

    Returns:
        The sensitivity maps.

    Raises:
        InputError: wrong rank or dtype, or a calibration width that does not fit.
    """
    from sigpy.mri.app import EspiritCalib

    if not isinstance(kspace, torch.Tensor):
        raise InputError(
            f"espirit_maps: kspace must be a torch tensor of shape (C, H, W) or (B, C, H, W), "
            f"got {type(kspace).__name__}."
        )
    if kspace.ndim not in (3, 4):
        raise InputError(
            f"espirit_maps: kspace of shape {tuple(kspace.shape)} must have shape (C, H, W) or (B, C, H, W)."
        )
    if not kspace.is_complex():
        raise InputError(
            f"espirit_maps: kspace of dtype {kspace.dtype} must be complex (torch.complex64), not real/imag "
            f"channels; use torch.view_as_complex on a (..., 2) tensor."
        )
    height, width = kspace.shape[-2:]
    rows, columns = (calib_width, calib_width) if isinstance(calib_width, int) else tuple(calib_width)
    if not (_ESPIRIT_KERNEL_WIDTH < rows <= height and _ESPIRIT_KERNEL_WIDTH < columns <= width):
        raise InputError(
            f"espirit_maps: calib_width={calib_width} must be more than {_ESPIRIT_KERNEL_WIDTH} and at most "
            f"(H, W)={(height, width)} for kspace of shape {tuple(kspace.shape)}."
        )
    if not 0 < crop < 1 or not threshold >= 0 or int(max_iter) < 1:
        raise InputError(
            f"espirit_maps: expected 0 < crop < 1, threshold >= 0 and max_iter >= 1, got crop={crop}, "
            f"threshold={threshold}, max_iter={max_iter}."
        )

    if rows != columns:
        items = kspace.reshape(-1, *kspace.shape[-3:])
        maps = torch.stack([_espirit(item, (rows, columns), threshold, crop, max_iter) for item in items])
        return maps.reshape(kspace.shape).to(kspace.device)
    batch = kspace.detach().to("cpu", torch.complex64).numpy()
    batched = batch.ndim == 4
    if not batched:
        batch = batch[None]
    maps = np.stack(
        [
            EspiritCalib(
                item,
                calib_width=int(rows),
                thresh=float(threshold),
                kernel_width=_ESPIRIT_KERNEL_WIDTH,
                crop=float(crop),
                max_iter=int(max_iter),
                show_pbar=False,
            ).run()
            for item in batch
        ]
    ).astype(np.complex64)
    if not batched:
        maps = maps[0]
    return torch.from_numpy(maps).to(kspace.device)


def _espirit(kspace: torch.Tensor, calib_shape: tuple[int, int], threshold: float, crop: float,
             max_iter: int) -> torch.Tensor:
    """ESPIRiT from a central ``calib_shape = (h, w)`` block of k-space: the algorithm of sigpy's
    ``EspiritCalib`` (which crops a square only) on any rectangle, in torch.

    Maths: the calibration matrix's rows are the ``6 × 6`` patches of the block (all coils); its right
    singular vectors above ``threshold · s_max`` are k-space kernels ``k_n``; per pixel
    ``G(r) = (HW / 36) Σ_n k̂_n(r) k̂_n(r)ᴴ`` (``k̂_n`` the centred inverse FFT of the kernel zero-padded
    to ``(H, W)``), computed as ``(√(HW) / 36) · ifft2c`` of the kernels' lag sums
    ``P_ij(d) = Σ_n Σ_{p − q = d} k_n,i(p) conj(k_n,j(q))``; the map is the top eigenvector of ``G(r)`` by ``max_iter`` power
    iterations from ones, phase relative to coil 0, zero where the eigenvalue is ``≤ crop``.
    Shape: ``kspace`` ``(C, H, W)`` complex64; returns ``(C, H, W)`` complex64 on the CPU.
    """
    coils, height, width = kspace.shape
    h, w, k = calib_shape[0], calib_shape[1], _ESPIRIT_KERNEL_WIDTH
    r0, c0 = height // 2 - h // 2, width // 2 - w // 2
    block = kspace.detach().cpu().to(torch.complex64)[:, r0:r0 + h, c0:c0 + w]
    patches = block.unfold(1, k, 1).unfold(2, k, 1)  # (C, h-k+1, w-k+1, k, k)
    matrix = patches.permute(1, 2, 0, 3, 4).reshape(-1, coils * k * k)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    kernels = vh[singular > threshold * singular.max()].reshape(-1, coils, k, k)
    # Σ_n k̂_n,i conj(k̂_n,j) depends on the kernels only through their products at each offset d = p − q, so G is
    # one inverse FFT per coil pair of those lag sums (C² FFTs instead of one per kernel and coil; equal to 1e-6)
    flat = kernels.reshape(len(kernels), -1)
    outer = (flat.T @ flat.conj()).reshape(coils, k, k, coils, k, k)  # Σ_n k_n,i(p) conj(k_n,j(q))
    lags = torch.zeros(coils, coils, 2 * k - 1, 2 * k - 1, dtype=torch.complex64)
    for qa in range(k):
        for qb in range(k):
            lags[..., k - 1 - qa:2 * k - 1 - qa, k - 1 - qb:2 * k - 1 - qb] += outer[..., qa, qb].permute(0, 3, 1, 2)
    padded = torch.zeros(coils, coils, height, width, dtype=torch.complex64)
    padded[..., height // 2 - (k - 1):height // 2 + k, width // 2 - (k - 1):width // 2 + k] = lags
    gram = ifft2c(padded).permute(2, 3, 0, 1) * (math.sqrt(height * width) / k ** 2)  # (H, W, C, C)
    maps = torch.ones(height, width, coils, 1, dtype=torch.complex64)
    eigenvalue = torch.ones(height, width, 1, 1)
    for _ in range(int(max_iter)):
        maps = gram @ maps
        eigenvalue = torch.linalg.vector_norm(maps, dim=-2, keepdim=True)
        maps = maps / eigenvalue
    maps = maps[..., 0].permute(2, 0, 1)  # (C, H, W)
    maps = maps * torch.sgn(maps[0]).conj()  # phase relative to coil 0
    return maps * (eigenvalue[..., 0, 0] > crop)


class MultiCoilSlice(Protocol):
    """What :func:`sensitivity_maps` reads of a slice; :class:`recon.data.Sample` is one.

    Shape: ``kspace`` ``(C, H, W)`` complex64; ``mask`` broadcastable to it (0/1); ``sens_maps``
    ``(C, H, W)`` complex64 or ``None``; ``fname`` and ``slice_idx`` name the slice in errors.
    """

    @property
    def kspace(self) -> torch.Tensor: ...

    @property
    def mask(self) -> torch.Tensor: ...

    @property
    def sens_maps(self) -> torch.Tensor | None: ...

    @property
    def fname(self) -> str: ...

    @property
    def slice_idx(self) -> int: ...


def sensitivity_maps(sample: MultiCoilSlice, oracle: bool = False, max_calib_width: int = _MAX_CALIB_WIDTH,
                     crop: float = ESPIRIT_CROP, block: str = ESPIRIT_BLOCK) -> torch.Tensor:
    """Coil sensitivities of a slice, shared by every method.

    Maths: ESPIRiT (:func:`espirit_maps`) on the sample's fully sampled centre of side
    :func:`acs_width` (≤ ``max_calib_width``) with ``block="square"``, or on its :func:`acs_rectangle`
    (every readout row of a 1-D mask × those columns; the default) — maps zeroed where the ESPIRiT eigenvalue is below
    ``crop``; single-coil data get a map of ones; ``oracle=True`` returns the sample's stored true
    maps (simulated sites), an upper bound that real data do not have.

    The crop is low (:data:`ESPIRIT_CROP`) because small calibration regions (8-12 lines, e.g.
    8 % of 96-128 columns) give eigenvalues well below 1 inside the object: sigpy's 0.95 then
    zeroes the maps over parts of the anatomy and SENSE-type solves diverge there.

    Shape: returns ``(C, H, W)`` complex64.

    Raises:
        InputError: ``oracle`` without stored maps, a centre too small for ESPIRiT, or an unknown
            ``block``.
    """
    source = f"{sample.fname} (slice {sample.slice_idx})"
    if block not in MAP_BLOCKS:
        raise InputError(f"ESPIRiT block (key 'maps_block') is {block!r}, expected one of {', '.join(MAP_BLOCKS)}.")
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
    size = acs_rectangle(sample.mask, max_calib_width) if block == "rectangle" else width
    return espirit_maps(sample.kspace, calib_width=size, crop=float(crop))


def rss(x: torch.Tensor, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
    """Root-sum-of-squares over coils.

    Maths: ``rss(x) = sqrt(sum_c |x_c|²)``.

    Shape: ``x`` ``(B, C, H, W)`` (coils on ``dim``) -> ``(B, H, W)``, or ``(B, 1, H, W)`` with
    ``keepdim=True``; real dtype (float32 for complex64 input).

    Args:
        x: Complex or real coil images.
        dim: Coil dimension.
        keepdim: Keep the reduced dimension with size 1 (the project's image shape).

    Returns:
        Real magnitude image.
    """
    # in double precision: a raw-scale image's squares overflow float32 above magnitudes of ~1e19
    wide = x.to(torch.complex128 if x.is_complex() else torch.float64)
    real = x.real.dtype if x.is_complex() else x.dtype
    return torch.linalg.vector_norm(wide, ord=2, dim=dim, keepdim=keepdim).to(real)
