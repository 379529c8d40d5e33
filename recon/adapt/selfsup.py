"""Self-supervised k-space loss: split the sampled set into Θ (data consistency) and Λ (held out).

The sampled set ``Ω`` (mask ``M``) is split at random into ``Θ`` — used for data consistency —
and ``Λ`` — held out to score the calibrated prior. The auto-calibration (ACS) region always stays
in ``Θ``; a fresh split is drawn at every step from an explicit generator. The loss on ``γ`` is::

    L(γ) = ‖M_Λ (F S x̂_γ) − y_Λ‖² / ‖y_Λ‖²

where ``x̂_γ`` is the calibrated denoiser's estimate made consistent with ``y_Θ`` (e.g.
``recon.dc.prox(theta_operator(op, split.theta), y, x̂, λ)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recon.errors import InputError
from recon.masks import center_box
from recon.operators import Sense, SingleCoil

__all__ = ["KSpaceSplit", "split_mask", "split_folds", "acs_mask", "theta_operator", "heldout_loss", "density_weights"]


class KSpaceSplit(NamedTuple):
    """A split of the sampled k-space ``Ω = Θ ∪ Λ``, ``Θ ∩ Λ = ∅``.

    Attributes:
        theta: ``(H, W)`` 0/1 mask of the entries kept for data consistency (ACS included).
        lam: ``(H, W)`` 0/1 mask of the held-out entries.
    """

    theta: torch.Tensor
    lam: torch.Tensor


def _central_columns(height: int, width: int, fraction: float) -> torch.Tensor:
    """The ``round(W · fraction)`` central columns, all rows (fastMRI's centre placement)."""
    num = round(width * fraction)
    pad = (width - num + 1) // 2
    box = torch.zeros(height, width, dtype=torch.float32)
    box[:, pad : pad + num] = 1
    return box


def _radius(shape: tuple[int, int], columns: bool) -> torch.Tensor:
    """Distance of each unit from the k-space centre: ``|k_x|/(W/2)`` per column ``(W,)``, or
    ``√((k_y/(H/2))² + (k_x/(W/2))²)`` per entry, flattened ``(H·W,)``; float64."""
    height, width = shape
    kx = (torch.arange(width, dtype=torch.float64) - width // 2).abs() / (width / 2)
    if columns:
        return kx
    ky = (torch.arange(height, dtype=torch.float64) - height // 2).abs() / (height / 2)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).flatten()


def acs_mask(shape: tuple[int, int], acs: float, columns: bool) -> torch.Tensor:
    """The auto-calibration region as a 0/1 mask.

    Maths: central ``round(W · acs)`` columns (all rows) when ``columns``; else the central box
    of :func:`recon.masks.center_box` (side ``acs`` of each dimension).
    Shape: returns ``(H, W)`` float32.
    """
    if isinstance(acs, bool) or not isinstance(acs, (int, float)) or not 0 <= acs <= 1:
        raise InputError(f"split_mask: acs must be a fraction in [0, 1] or an (H, W) mask, got {acs!r}.")
    height, width = shape
    return _central_columns(height, width, float(acs)) if columns else center_box((height, width), float(acs))


def split_mask(
    mask: torch.Tensor,
    *,
    generator: torch.Generator,
    ratio: float = 0.4,
    acs: float | torch.Tensor = 0.08,
    columns: bool | None = None,
    stratified: bool = False,
) -> KSpaceSplit:
    """Random split of the sampled entries into Θ (kept) and Λ (held out), ACS kept in Θ.

    Maths: of the ``n`` sampled entries (columns, for row-constant masks) that do not touch the
    ACS region, ``m = clip(round(ratio · n), 1, n')`` chosen uniformly at random (``torch.randperm``
    with ``generator``) form ``Λ``; ``Θ = Ω \\ Λ``. ``n' = n`` if ``Θ`` keeps some ACS entry, else
    ``n − 1``, so neither part is empty. ``Θ + Λ = M``. ``stratified``: the ``n`` units sorted by their
    distance from the k-space centre (``|k_x|/(W/2)`` for columns, ``√((k_y/(H/2))² + (k_x/(W/2))²)`` for
    entries; ties in random order) are cut into ``m`` consecutive strata of (almost) equal count, and ``Λ``
    takes one unit drawn uniformly from each, so ``Λ`` spans the distances the mask samples (a plain draw
    of a few columns can miss the band just outside the ACS, where most of the error lies).
    Shape: ``mask`` ``(H, W)`` of 0/1 (float or bool); returns two ``(H, W)`` masks of
    ``mask``'s float dtype (float32 for bool) on its device.

    Args:
        mask: The sampling mask ``M``.
        generator: Source of randomness; the same generator state gives the same split, and
            successive calls give fresh splits.
        ratio: Fraction of the sampled non-ACS entries moved to ``Λ``, in ``(0, 1)``.
        acs: ACS region kept in ``Θ``: a fraction (central columns for column masks, the central
            box of :func:`recon.masks.center_box` otherwise) or an ``(H, W)`` 0/1 mask.
        columns: Split whole columns, so that both parts stay row-constant; default: when
            ``mask`` is constant along ``H`` (1-D Cartesian undersampling).
        stratified: Draw ``Λ`` stratified by the distance from the k-space centre (above).

    Returns:
        The :class:`KSpaceSplit` ``(theta, lam)``.

    Raises:
        InputError: malformed mask / acs / ratio, ``columns=True`` on a mask that varies along
            ``H``, or too few sampled entries outside the ACS region to hold any out.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_complex():
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"split_mask: mask must be a real (H, W) tensor of 0/1, got {got}.")
    if not isinstance(generator, torch.Generator):
        raise InputError(f"split_mask: generator must be a torch.Generator, got {type(generator).__name__}.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise InputError(f"split_mask: ratio must be a number in (0, 1), got {ratio!r}.")
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    sampled = mask != 0
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("split_mask: mask must hold only 0 and 1 values.")
    row_constant = bool(torch.equal(sampled, sampled[:1].expand_as(sampled)))
    if columns is None:
        columns = row_constant
    elif columns and not row_constant:
        raise InputError("split_mask: columns=True needs a mask that is constant along H (1-D Cartesian).")
    shape = (mask.shape[0], mask.shape[1])
    if isinstance(acs, torch.Tensor):
        if tuple(acs.shape) != shape or acs.is_complex():
            raise InputError(f"split_mask: acs mask must be a real tensor of shape {shape}, got {tuple(acs.shape)}.")
        acs_region = acs.to(mask.device) != 0
    else:
        acs_region = acs_mask(shape, acs, bool(columns)).to(mask.device) != 0
    acs_kept = sampled & acs_region

    if columns:
        units = sampled[0] & ~acs_region.any(dim=0)  # sampled columns free of ACS entries, (W,)
    else:
        units = (sampled & ~acs_region).flatten()
    candidates = torch.nonzero(units).flatten()
    n = int(candidates.numel())
    most = n if bool(acs_kept.any()) else n - 1
    if most < 1:
        raise InputError(
            f"split_mask: the mask has {n} sampled {'columns' if columns else 'entries'} outside the ACS region, "
            f"expected enough to hold some out (lower acs or sample more)."
        )
    count = min(max(1, round(ratio * n)), most)
    order = torch.randperm(n, generator=generator, device=generator.device).to(candidates.device)
    if stratified:
        order = order[torch.sort(_radius(shape, bool(columns)).to(candidates.device)[candidates[order]], stable=True).indices]
        edges = torch.div(torch.arange(count + 1) * n, count, rounding_mode="floor")
        draw = torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        order = order[(edges[:-1] + (draw * (edges[1:] - edges[:-1])).long()).to(order.device)]
    held = torch.zeros_like(units)
    held[candidates[order[:count]]] = True
    lam = held.expand(shape) if columns else held.view(shape)
    lam_f = lam.to(dtype).contiguous()
    theta_f = (sampled & ~lam).to(dtype)
    return KSpaceSplit(theta=theta_f, lam=lam_f)


def split_folds(lam: torch.Tensor, folds: int, *, generator: torch.Generator) -> list[torch.Tensor]:
    """Partition a held-out set ``Λ`` into ``K`` disjoint folds of (almost) equal size, at random.

    Maths: the units of ``Λ`` (its columns when ``Λ`` is constant along ``H``, else its entries) in a random
    order (``torch.randperm`` with ``generator``), dealt into ``K`` folds round-robin: ``Σ_k Λ_k = Λ``,
    ``Λ_j Λ_k = 0`` for ``j ≠ k``.
    Shape: ``lam`` ``(H, W)`` 0/1; returns ``K`` masks ``(H, W)`` of ``lam``'s dtype.

    Raises:
        InputError: ``K < 1`` or fewer units than folds.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise InputError(f"split_folds: folds must be a positive integer, got {folds!r}.")
    held = lam != 0
    columns = bool(torch.equal(held, held[:1].expand_as(held)))
    units = held[0] if columns else held.flatten()
    index = torch.nonzero(units).flatten()
    if index.numel() < folds:
        raise InputError(f"split_folds: the held-out set has {index.numel()} {'columns' if columns else 'entries'}, "
                         f"expected at least {folds} (one per fold).")
    order = index[torch.randperm(index.numel(), generator=generator, device=generator.device).to(index.device)]
    out = []
    for k in range(folds):
        unit = torch.zeros_like(units)
        unit[order[k::folds]] = True
        mask = unit.expand(held.shape) if columns else unit.view(held.shape)
        out.append(mask.to(lam.dtype).contiguous())
    return out


def density_weights(mask: torch.Tensor, acs: float | torch.Tensor, min_count: int = 64,
                    max_bins: int = 16) -> torch.Tensor | None:
    """Density compensation of the held-out loss: ``w = 1 / p``, ``p`` the mask's sampling density outside the ACS.

    Λ is drawn uniformly from the sampled non-ACS entries, so an entry lies in Λ with probability ∝ ``p(k)``, and
    ``Σ_{k∈Λ} w(k)|r(k)|²`` estimates the error over all of the non-ACS k-space the mask reaches, not only
    where it samples densely (a variable-density mask holds out mostly low frequencies; unweighted, the loss
    rewards a prior that trades high-frequency error for low-frequency error).
    Maths: units are the sampled columns (row-constant masks) or entries; their distance from the centre
    ``u = |k_x|/(W/2)`` (columns) or ``√((k_y/(H/2))² + (k_x/(W/2))²)``; the sampled non-ACS units are cut at
    the quantiles of ``u`` into ``clip(n // min_count, 1, max_bins)`` bins of equal count (≥ ``min_count``
    sampled units each), ``p`` = sampled / candidate units (non-ACS) per bin; ``w`` is normalised to mean 1
    over the sampled non-ACS entries. One bin — every 1-D mask with fewer than ``2·min_count`` sampled
    columns outside its centre — is no compensation: returns None (the unweighted loss).
    Shape: ``mask`` ``(H, W)`` 0/1; ``acs`` as in :func:`split_mask` (a fraction or an ``(H, W)`` 0/1 mask);
    returns ``(H, W)`` float32 (0 outside the sampled non-ACS entries) or None.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"density_weights: mask must be an (H, W) tensor of 0/1, got {got}.")
    sampled = mask.detach().cpu() != 0
    height, width = sampled.shape
    row_constant = bool(torch.equal(sampled, sampled[:1].expand_as(sampled)))
    if isinstance(acs, torch.Tensor):
        if tuple(acs.shape) != (height, width):
            raise InputError(f"density_weights: acs mask must have the mask's shape {(height, width)}, "
                             f"got {tuple(acs.shape)}.")
        acs_region = acs.detach().cpu() != 0
    else:
        acs_region = acs_mask((height, width), acs, row_constant) != 0
    u = _radius((height, width), row_constant)
    if row_constant:  # 1-D: units are columns
        candidate = ~acs_region.any(dim=0)
        taken = sampled[0] & candidate
    else:
        candidate = ~acs_region
        taken, u = sampled & candidate, u.view(height, width)
    n = int(taken.sum())
    bins = min(max(n // min_count, 1), max_bins)
    if bins == 1:
        return None
    edges = torch.quantile(u[taken], torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    edges[0], edges[-1] = -1.0, float(u[taken].max())  # the last bin ends at the farthest sample: no corners
    index = (torch.bucketize(u, edges[1:-1], right=True)).clamp(max=bins - 1)
    reach = u <= edges[-1]
    density = torch.zeros(bins, dtype=torch.float64)
    for b in range(bins):
        within = (index == b) & candidate & reach
        density[b] = (taken & within).sum() / within.sum().clamp(min=1)
    weight = torch.where(taken, 1.0 / density[index].clamp(min=1e-12), torch.zeros((), dtype=torch.float64))
    weight = weight / weight[taken].mean()
    if weight.dim() == 1:
        weight = weight.expand(height, width)
    return weight.to(torch.float32).to(mask.device).contiguous()


def theta_operator(op: Sense, theta: torch.Tensor) -> Sense:
    """The same operator restricted to ``Θ``: same maps, mask ``Θ`` (operators are immutable).

    Maths: ``A_Θ = M_Θ F S``.
    Shape: ``theta`` broadcastable to the operator's k-space ``(B, C, H, W)``.
    """
    if isinstance(op, SingleCoil):
        return SingleCoil(theta, op.shape, dtype=op.sens_maps.dtype, device=op.sens_maps.device)
    if isinstance(op, Sense):
        return Sense(op.sens_maps, theta, fused=op.fused)
    raise InputError(f"theta_operator: expected a Sense or SingleCoil operator, got {type(op).__name__}.")


def heldout_loss(op: Sense, y: torch.Tensor, x: torch.Tensor, lam: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised held-out k-space error, averaged over the batch; differentiable in ``x``.

    Maths: ``mean_i ‖M_Λ (F S x_i) − M_Λ y_i‖²_w / ‖M_Λ y_i‖²_w`` (``Λ ⊆ Ω``, binary masks, so
    ``M_Λ M_Ω = M_Λ``; ``‖r‖²_w = Σ_k w(k)|r(k)|²``, ``w = 1`` without ``weight``, e.g. :func:`density_weights`);
    invariant to a common scale of ``x`` and ``y``.
    Shape: ``y`` ``(B, C, H, W)`` complex; ``x`` ``(B, 1, H, W)`` complex; ``lam`` broadcastable
    to ``y`` (typically ``(H, W)``); returns a real scalar.

    Args:
        op: The full operator ``A = M_Ω F S`` (:class:`Sense` or :class:`SingleCoil`).
        y: Measured k-space.
        x: Image estimate (consistent with ``y_Θ`` only).
        lam: The held-out mask ``M_Λ``.
        weight: Non-negative weights per k-space entry, broadcastable to ``y`` (None: all 1).

    Raises:
        InputError: shapes that do not fit, or a batch item with no energy on ``Λ``.
    """
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(op.shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"heldout_loss: y must have the operator's k-space shape {tuple(op.shape)}, got {got}.")
    try:
        torch.broadcast_shapes(lam.shape, y.shape)
    except RuntimeError:
        raise InputError(
            f"heldout_loss: lam mask of shape {tuple(lam.shape)} does not broadcast to k-space {tuple(y.shape)}."
        ) from None
    lam = lam.to(device=y.device, dtype=y.real.dtype)
    y_held = lam * y
    residual = lam * op.A(x) - y_held
    dims = tuple(range(1, y.dim()))
    power = y_held.real.square() + y_held.imag.square()
    energy = power.sum(dim=dims)
    if bool((energy == 0).any()):
        raise InputError("heldout_loss: y has no energy on the held-out set Λ for some batch item; expected Λ ⊆ Ω.")
    error = residual.real.square() + residual.imag.square()
    if weight is not None:
        weight = weight.to(device=y.device, dtype=y.real.dtype)
        energy = (weight * power).sum(dim=dims)
        if bool((energy == 0).any()):
            raise InputError("heldout_loss: the weights leave no energy on the held-out set Λ for some batch item.")
        error = weight * error
    return (error.sum(dim=dims) / energy).mean()
