"""Frequency-guided prior calibration: a handful of band gains on a network's feature maps.

For each selected layer ``l`` with output feature map ``h`` (``N × C × H × W``, real) and ``B``
smooth radial frequency bands ``W_b`` on that map's own grid (``Σ_b W_b = 1``), a forward hook
replaces the layer's output by::

    h ← h + Σ_b γ[l, b] · Re(IFFT2(W_b ⊙ FFT2(h)))  =  h + Re(IFFT2((Σ_b γ[l, b] W_b) ⊙ FFT2(h)))

``γ`` (shape ``(L, B)``, ``L · B < 100``) starts at zero; then the correction is exactly ``0`` and
``h + 0 == h`` in IEEE arithmetic, so the calibrated network is the pre-trained one, bit for bit,
while autograd still reaches ``γ``. The hooks work on any ``nn.Module`` (our ``ScoreModel``,
``fastmri.models.Unet`` / ``VarNet``, …) and are removed by :meth:`FrequencyCalibration.detach`,
which leaves the module exactly as it was (its weights are never touched).

A fitted ``γ`` is passed on as a :class:`recon.adapt.families.CalibratedPrior` (a value: the prior with that γ
fixed) and saved as a *site profile* (:mod:`recon.adapt.profiles`). The other calibration families are in
:mod:`recon.adapt.families`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from recon.errors import InputError

__all__ = [
    "MAX_VARIABLES",
    "R_MAX",
    "Calibration",
    "FrequencyCalibration",
    "radial_bands",
    "default_band_edges",
    "candidate_layers",
]

MAX_VARIABLES: int = 99
"""Largest number ``L · B`` of calibration variables (the method keeps it below 100)."""

R_MAX: float = math.sqrt(2.0)
"""Largest normalised radial frequency ``r = 2 sqrt(fx² + fy²)`` (a corner of the grid)."""



# --------------------------------------------------------------------------------------------
# frequency bands
# --------------------------------------------------------------------------------------------


def default_band_edges(bands: int) -> tuple[float, ...]:
    """Band boundaries evenly spaced in the normalised radius.

    Maths: ``e_i = i · √2 / B`` for ``i = 1 … B − 1``.
    Shape: returns ``B − 1`` floats in ``(0, √2)``.
    """
    return tuple(i * R_MAX / bands for i in range(1, bands))


def _check_band_edges(bands: int, band_edges: Sequence[float] | None) -> tuple[float, ...]:
    if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or bands < 1:
        raise InputError(f"calibration: bands must be a positive integer, got {bands!r}.")
    if band_edges is None:
        return default_band_edges(int(bands))
    try:
        edges = tuple(float(e) for e in band_edges)
    except (TypeError, ValueError):
        raise InputError(f"calibration: band_edges must be a sequence of numbers, got {band_edges!r}.") from None
    if len(edges) != bands - 1:
        raise InputError(
            f"calibration: band_edges must hold bands - 1 = {bands - 1} boundaries, got {len(edges)}."
        )
    bounds = (0.0,) + edges + (R_MAX,)
    if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise InputError(
            f"calibration: band_edges must increase strictly inside (0, {R_MAX:.4f}), got {list(edges)}."
        )
    return edges


@functools.lru_cache(maxsize=64)
def _radial_bands_cached(
    height: int, width: int, edges: tuple[float, ...], device: str, dtype: torch.dtype
) -> torch.Tensor:
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    r = 2.0 * torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    bounds = (0.0,) + edges + (R_MAX,)
    # rising raised-cosine steps s_i (0 below e_i - w_i, 1 above e_i + w_i), i = 1 … B-1;
    # each transition takes at most half of each neighbouring gap, so they never overlap
    steps = []
    for i in range(1, len(bounds) - 1):
        half = 0.5 * min(bounds[i] - bounds[i - 1], bounds[i + 1] - bounds[i])
        t = ((r - (bounds[i] - half)) / (2.0 * half)).clamp(0.0, 1.0)
        steps.append(0.5 - 0.5 * torch.cos(math.pi * t))
    ones = torch.ones_like(r)
    lower = [ones] + steps  # s_0 = 1
    upper = steps + [torch.zeros_like(r)]  # s_B = 0
    bands = torch.stack([lo - up for lo, up in zip(lower, upper)])  # telescopes to 1
    return bands.to(device=device, dtype=dtype)


def radial_bands(
    height: int,
    width: int,
    bands: int = 3,
    band_edges: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Smooth radial partition of unity on an ``H × W`` FFT grid (unshifted order).

    Maths: ``r = 2 √(fx² + fy²)`` with ``fx, fy`` from ``torch.fft.fftfreq`` (``r ∈ [0, √2]``);
    ``W_b = s_b(r) − s_{b+1}(r)`` with ``s_0 = 1``, ``s_B = 0`` and ``s_i`` a raised-cosine step
    centred on edge ``e_i`` — so ``Σ_b W_b = 1``, ``0 ≤ W_b ≤ 1``, ``W_b = ½`` at ``r = e_b``.
    Shape: returns ``(B, H, W)`` real ``dtype`` (cached per size, edges, device and dtype; do
    not modify it in place).

    Args:
        height: Rows ``H`` of the feature map.
        width: Columns ``W`` of the feature map.
        bands: Number of bands ``B``.
        band_edges: ``B − 1`` increasing boundaries in ``(0, √2)``; evenly spaced by default.
        device: Device of the returned tensor.
        dtype: Real dtype of the returned tensor.

    Returns:
        The band weights, lowest band first.
    """
    edges = _check_band_edges(bands, band_edges)
    return _radial_bands_cached(int(height), int(width), edges, str(torch.device(device)), dtype)


# --------------------------------------------------------------------------------------------
# layer selection
# --------------------------------------------------------------------------------------------


def _evenly_spaced(count: int, pick: int) -> list[int]:
    if pick >= count:
        return list(range(count))
    if pick == 1:
        return [count // 2]
    return [round(i * (count - 1) / (pick - 1)) for i in range(pick)]


def candidate_layers(module: nn.Module) -> list[str]:
    """Names of the layers that ``layers="auto"`` chooses from, in forward order.

    The module's ``blocks`` when it exposes them (modules or ``(name, module)`` pairs, e.g. the
    residual blocks of the score U-Net), else every ``nn.Conv2d`` in ``named_modules`` order
    except the very last one (the output convolution).
    Shape: returns a list of dotted module names as in ``module.named_modules()``.

    Raises:
        InputError: no candidate layer, or a block that is not a submodule of ``module``.
    """
    named = list(module.named_modules())
    blocks = getattr(module, "blocks", None)
    if blocks is not None:
        name_of = {id(m): n for n, m in named}
        by_name = dict(named)
        names: list[str] = []
        for entry in blocks:
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                name, block = entry
                ok = by_name.get(name) is block
            else:
                block, name = entry, name_of.get(id(entry))
                ok = name is not None
            if not ok or not isinstance(block, nn.Module):
                raise InputError(
                    f"calibration: {type(module).__name__}.blocks holds an entry that is not one of its "
                    f"submodules ({name!r}); expected submodules or (name, submodule) pairs."
                )
            names.append(name)
    else:
        names = [n for n, m in named if isinstance(m, nn.Conv2d)][:-1]
    if not names:
        raise InputError(
            f"calibration: {type(module).__name__} has no candidate layer for layers='auto' (no blocks and "
            f"fewer than two nn.Conv2d); expected a list of layer names."
        )
    return names


# --------------------------------------------------------------------------------------------
# the calibration
# --------------------------------------------------------------------------------------------


def noise_level(sigma: float | torch.Tensor) -> float:
    """A noise level as a float: ``sigma`` itself, or a tensor's first value (a batch shares its level)."""
    return float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)


def require_module(module: object) -> None:
    """Raises InputError unless ``module`` is an ``nn.Module`` (what every calibration hooks into)."""
    if not isinstance(module, nn.Module):
        raise InputError(f"calibration: module must be a torch.nn.Module, got {type(module).__name__}.")


def check_count(family: str, count: int) -> None:
    """Raises InputError unless ``1 ≤ count ≤ MAX_VARIABLES``, naming the family."""
    if count < 1:
        raise InputError(f"calibration family {family!r}: no variable to fit; expected at least one.")
    if count > MAX_VARIABLES:
        raise InputError(f"calibration family {family!r}: {count} variables, expected at most {MAX_VARIABLES}; "
                         f"choose fewer layers, blocks or bands.")


class Calibration(nn.Module):
    """The contract of every calibration family (:mod:`recon.adapt.families`): ``gamma``, the hooks, and the
    calibrated denoiser.

    The wrapped module is held by reference, not registered: ``parameters()`` and ``state_dict()`` hold ``γ``
    only, and ``.to()`` moves only ``γ``. A family registers its hooks in :meth:`_hooks`; :meth:`detach` removes
    them, leaving the module exactly as it was. ``denoise`` is the calibrated denoiser ``D_γ(x, s)`` (attach
    first), bit for bit the module's own ``denoise`` at ``γ = 0``.
    Shape: ``gamma`` as the family defines it (float32 zeros); ``denoise`` complex ``(B, 1, H, W)``.
    """

    family = "base"
    layer_names: tuple[str, ...] = ()  # the hooked layers (none for the denoiser-level families)
    band_edges: tuple[float, ...] = ()  # the bands family's only

    def __init__(self, module: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        require_module(module)
        self.__dict__["_module"] = module  # a reference, not a registered submodule
        self.__dict__["_handles"] = []
        self.gamma = nn.Parameter(torch.zeros(*shape))
        self.below: float | None = None  # the noise levels γ acts at: σ ≤ below (None: every level)
        self._outer_attached = False
        check_count(self.family, self.gamma.numel())

    @property
    def module(self) -> nn.Module:
        """The wrapped module."""
        return self.__dict__["_module"]

    @property
    def num_variables(self) -> int:
        """The number of calibration variables."""
        return self.gamma.numel()

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self.__dict__["_handles"])

    def _hooks(self) -> list[Any]:
        """The handles of the family's hooks, registered now (none for denoiser-level families)."""
        return []

    def attach(self) -> "Calibration":
        """Register the hooks (no-op if attached). Returns ``self``."""
        if not self.attached:
            self.__dict__["_handles"].extend(self._hooks())
            if not self.__dict__["_handles"]:
                self.__dict__["_handles"].append(None)  # attached, with nothing to remove
        return self

    def detach(self) -> "Calibration":
        """Remove the hooks (no-op if detached); the module is then exactly as before. Returns ``self``."""
        handles: list[RemovableHandle | None] = self.__dict__["_handles"]
        while handles:
            handle = handles.pop()
            if handle is not None:
                handle.remove()
        return self

    def __enter__(self) -> "Calibration":
        self._outer_attached = self.attached
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        if not self._outer_attached:
            self.detach()

    @torch.no_grad()
    def reset(self) -> None:
        """Set ``γ = 0`` (the pre-trained network)."""
        self.gamma.zero_()

    def _load_gamma(self, gamma: torch.Tensor, source: str) -> None:
        load_gamma(self.gamma, gamma, source)

    def acts_at(self, sigma: float | torch.Tensor) -> bool:
        """Whether γ acts at noise level ``sigma`` (``σ ≤ below``; always when ``below`` is None)."""
        return self.below is None or noise_level(sigma) <= self.below

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``D_γ(x, s)`` at the levels γ acts at (:meth:`acts_at`): the module's denoiser with the hooks (attach
        first) and the family's own changes; at the other levels the module's own ``D(x, s)``, hooks off."""
        if self.acts_at(sigma):
            return self._denoise(x, sigma)
        if not self.attached:
            return self.module.denoise(x, sigma)
        self.detach()
        try:
            return self.module.denoise(x, sigma)
        finally:
            self.attach()

    def _denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The calibrated denoiser where γ acts: the module's, through the hooks (families may change it)."""
        return self.module.denoise(x, sigma)


class FrequencyCalibration(Calibration):
    """Layer-wise frequency-band gains ``γ`` attached to a network through forward hooks.

    Maths: output ``h`` of layer ``l`` ← ``h + Re(IFFT2((Σ_b γ[l, b] W_b) ⊙ FFT2(h)))`` with the
    bands of :func:`radial_bands` on ``h``'s own ``H × W`` grid; exact identity at ``γ = 0``
    (for finite feature maps: ``0 · finite = 0``; an Inf/NaN feature would spread through the FFT).
    Shape: ``gamma`` ``(L, B)`` float32 (an ``nn.Parameter``, zeros); hooked layers must output
    real ``(N, C, H, W)`` tensors (any ``H, W``, even different sizes on different calls).

    The wrapped module is held by reference, not registered: ``parameters()`` and
    ``state_dict()`` hold ``gamma`` only, and ``.to()`` moves only ``gamma``. The module's
    weights, training mode and ``requires_grad`` flags are never changed; freeze it yourself
    (``requires_grad_(False)``) so that gradients reach ``γ`` only.

    Args:
        module: Any ``nn.Module``.
        layers: ``"auto"`` (``num_layers`` evenly spaced among :func:`candidate_layers`) or a
            list of module names from ``module.named_modules()``.
        num_layers: How many layers ``"auto"`` picks (fewer when there are fewer candidates).
        bands: Number of radial bands ``B``.
        band_edges: ``B − 1`` band boundaries in ``(0, √2)``; evenly spaced by default.

    Raises:
        InputError: unknown or repeated layer names, no candidate layer, bad bands, or
            ``L · B > 99``.

    Example::

        calib = FrequencyCalibration(model).attach()
        opt = torch.optim.Adam(calib.parameters(), lr=1e-2)
        ...
        calib.detach()
    """

    family = "bands"

    def __init__(
        self,
        module: nn.Module,
        layers: str | Sequence[str] = "auto",
        num_layers: int = 24,
        bands: int = 3,
        band_edges: Sequence[float] | None = None,
    ) -> None:
        require_module(module)
        edges = _check_band_edges(bands, band_edges)
        bands = int(bands)
        by_name = dict(module.named_modules())
        if isinstance(layers, str):
            if layers != "auto":
                raise InputError(f"calibration: layers must be 'auto' or a list of layer names, got {layers!r}.")
            if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
                raise InputError(f"calibration: num_layers must be a positive integer, got {num_layers!r}.")
            candidates = candidate_layers(module)
            names = [candidates[i] for i in _evenly_spaced(len(candidates), int(num_layers))]
        else:
            names = list(layers)
            if not names:
                raise InputError("calibration: layers is an empty list; expected at least one layer name.")
            for name in names:
                if not isinstance(name, str) or name not in by_name or name == "":
                    raise InputError(
                        f"calibration: layer {name!r} is not a submodule of {type(module).__name__}; expected "
                        f"a name from module.named_modules()."
                    )
            if len(set(names)) != len(names):
                raise InputError(f"calibration: layers lists a layer more than once: {names}.")
        if len(names) * bands > MAX_VARIABLES:
            raise InputError(
                f"calibration: {len(names)} layers x {bands} bands = {len(names) * bands} variables, "
                f"expected at most {MAX_VARIABLES}; choose fewer layers or bands."
            )
        super().__init__(module, (len(names), bands))
        self.band_edges: tuple[float, ...] = edges
        self.bands = bands
        self.__dict__["_layers"] = [by_name[n] for n in names]
        self.layer_names: tuple[str, ...] = tuple(names)

    def extra_repr(self) -> str:
        return f"layers={len(self.layer_names)}, bands={self.bands}, attached={self.attached}"

    # -- hooks ----------------------------------------------------------------------------------

    def _hook(self, index: int, _layer: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() != 4 or not output.is_floating_point():
            got = (
                f"a {output.dtype} tensor of shape {tuple(output.shape)}"
                if isinstance(output, torch.Tensor)
                else f"a {type(output).__name__}"
            )
            raise InputError(
                f"calibration: layer {self.layer_names[index]!r} returned {got}, expected a real 4-D feature "
                f"map (batch, channels, H, W); choose another layer."
            )
        work = torch.float64 if output.dtype == torch.float64 else torch.float32
        height, width = output.shape[-2:]
        bands = _radial_bands_cached(int(height), int(width), self.band_edges, str(output.device), work)
        gain = torch.tensordot(self.gamma[index].to(device=output.device, dtype=work), bands, dims=1)  # (H, W)
        spectrum = torch.fft.fft2(output.to(work))
        correction = torch.fft.ifft2(spectrum * gain).real
        return output + correction.to(output.dtype)  # γ = 0: correction ≡ 0, so output + 0 == output

    def _hooks(self) -> list[RemovableHandle]:
        return [layer.register_forward_hook(functools.partial(self._hook, index))
                for index, layer in enumerate(self.__dict__["_layers"])]

    # -- values ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """A copy of the calibration: ``{"layers": [...], "band_edges": [...], "gamma": (L, B) tensor}``."""
        return {
            "layers": list(self.layer_names),
            "band_edges": list(self.band_edges),
            "gamma": self.gamma.detach().cpu().clone(),
        }

    @torch.no_grad()
    def load_state(self, state: dict[str, Any], source: str = "calibration state") -> None:
        """Load a :meth:`state` taken from a calibration of the same layers and bands.

        Raises:
            InputError: naming ``source`` and the key (``layers``, ``band_edges``, ``gamma``) that differs.
        """
        for key in ("layers", "band_edges", "gamma"):
            if key not in state:
                raise InputError(f"{source}: missing key {key!r}.")
        if list(state["layers"]) != list(self.layer_names):
            raise InputError(
                f"{source}: key 'layers' names {list(state['layers'])}, expected this calibration's layers "
                f"{list(self.layer_names)}."
            )
        if [float(e) for e in state["band_edges"]] != list(self.band_edges):
            raise InputError(
                f"{source}: key 'band_edges' is {list(state['band_edges'])}, expected {list(self.band_edges)}."
            )
        self._load_gamma(torch.as_tensor(state["gamma"]), source)


def load_gamma(target: nn.Parameter, gamma: torch.Tensor, source: str) -> None:
    """Copy a saved ``γ`` into a calibration's ``target`` after checking its shape and values.

    Raises:
        InputError: naming ``source`` and the key ``gamma``: another shape or non-finite values.
    """
    if tuple(gamma.shape) != tuple(target.shape) or not bool(torch.isfinite(gamma).all()):
        raise InputError(
            f"{source}: key 'gamma' has shape {tuple(gamma.shape)}, expected finite values of shape "
            f"{tuple(target.shape)}."
        )
    with torch.no_grad():
        target.copy_(gamma.to(target.dtype))
