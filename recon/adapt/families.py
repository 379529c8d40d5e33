"""Families of < 100 calibration variables ``γ`` for a pre-trained denoiser, each exactly the prior at ``γ = 0``.

Each family is one reading of "layer-wise variables that selectively modulate frequency-specific features of
the score network". All of them share :class:`Calibration`'s contract: ``gamma`` (an ``nn.Parameter`` of
zeros), :meth:`~Calibration.attach` / :meth:`~Calibration.detach` (forward hooks; detached, the module is
exactly as before and its weights are never touched), and :meth:`~Calibration.denoise` — the calibrated
denoiser ``D_γ(x, s)``, bit for bit the prior's ``D(x, s)`` at ``γ = 0`` (every correction is ``h·1``,
``h + 0`` or ``s·exp(0)``).

=================  ==========================================================================  ============
family             what ``γ`` changes                                                          variables
=================  ==========================================================================  ============
``bands``          radial band gains on the outputs of the network's blocks                    18 × B
                   (:class:`recon.adapt.calibration.FrequencyCalibration`)
``conv_gain``      one gain per convolution (all but the output one): ``h ← (1 + γ_l) h``      one per conv
``norm_affine``    a scale and a shift per normalisation layer: ``h ← (1 + a_l) h + b_l``      2 per norm
``freeu``          per decoder stage: the backbone features ``(1 + b_s) h`` and the low        2 per stage
                   frequencies of the skip features ``s + c_s · LP(s)`` (FreeU, Si et al. 2024)
``residual_bands`` the denoiser's frequency response per noise-level block: radial band gains  K × B
                   on the residual ``D(x, s) − x`` in image space
``sigma_in``       the noise level the network is told: ``D(x, s · exp(γ_k))`` per level       K
                   block ``k``
``sigma_residual`` ``sigma_in`` and ``residual_bands`` together                                K₁ + K₂ × B
=================  ==========================================================================  ============

The per-level families split the schedule's ``[σ_end, σ_start]`` into ``K`` blocks evenly in ``log σ``
(:func:`level_block`); a level outside it falls in the nearest block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recon.adapt.calibration import (Calibration, FrequencyCalibration, _radial_bands_cached, default_band_edges,
                                     noise_level, require_module)
from recon.errors import InputError

__all__ = ["FAMILIES", "Calibration", "CalibratedPrior", "CalibrationShape", "ConvGain", "NormAffine", "FreeU", "ResidualBands", "SigmaIn",
           "SigmaResidual", "level_block", "make_calibration"]

NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)


def level_block(sigma: float, sigma_range: tuple[float, float], blocks: int) -> int:
    """The block ``k ∈ [0, K)`` of a noise level: ``⌊K · log(σ_start/σ) / log(σ_start/σ_end)⌋``, clamped.

    Shape: scalars (``sigma`` a float or a 0-d / ``(B,)`` tensor whose first value decides)."""
    value = noise_level(sigma)
    start, end = sigma_range
    position = math.log(start / max(value, 1e-30)) / math.log(start / end)
    return min(max(int(math.floor(blocks * position)), 0), blocks - 1)


class _LayerGains(Calibration):
    """Hooks on a list of layers, one row of ``γ`` each."""

    def __init__(self, module: nn.Module, layers: list[tuple[str, nn.Module]], per_layer: int) -> None:
        if not layers:
            raise InputError(f"calibration family {self.family!r}: {type(module).__name__} has no layer of the "
                             f"kind this family hooks.")
        self.layer_names = tuple(n for n, _ in layers)
        super().__init__(module, (len(layers), per_layer) if per_layer > 1 else (len(layers),))
        self.__dict__["_layers"] = [m for _, m in layers]

    def _hooks(self) -> list[Any]:
        return [layer.register_forward_hook(functools.partial(self._hook, i))
                for i, layer in enumerate(self.__dict__["_layers"])]

    def _hook(self, index: int, _layer: nn.Module, _inputs: Any, output: Any) -> Any:
        raise NotImplementedError


class ConvGain(_LayerGains):
    """One gain per convolution (every ``nn.Conv2d`` but the last, the output one): ``h ← h · (1 + γ_l)``.

    Shape: ``gamma`` ``(L,)``; hooked outputs real ``(N, C, H, W)``.
    """

    family = "conv_gain"

    def __init__(self, module: nn.Module) -> None:
        convs = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)][:-1]
        super().__init__(module, convs, 1)

    def _hook(self, index: int, _layer: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * (1.0 + self.gamma[index]).to(output.dtype)


class NormAffine(_LayerGains):
    """A scale and a shift per normalisation layer (GroupNorm, BatchNorm2d, InstanceNorm2d, LayerNorm):
    ``h ← (1 + a_l) h + b_l``.

    Shape: ``gamma`` ``(L, 2)`` = ``[a_l, b_l]``.
    """

    family = "norm_affine"

    def __init__(self, module: nn.Module) -> None:
        norms = [(n, m) for n, m in module.named_modules() if isinstance(m, NORM_TYPES)]
        super().__init__(module, norms, 2)

    def _hook(self, index: int, _layer: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        a, b = self.gamma[index, 0].to(output.dtype), self.gamma[index, 1].to(output.dtype)
        return output * (1.0 + a) + b


def _low_pass(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The lowest of two radial bands (:func:`recon.adapt.calibration.radial_bands`, edge √2/2)."""
    return _radial_bands_cached(height, width, default_band_edges(2), str(device), dtype)[0]


def decoder_stages(module: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """The first layer of each decoder stage and the number of backbone channels of its input.

    Our U-Net (``decoder``: stages of blocks, input ``cat([h, skip])``) and ``fastmri.models.Unet``
    (``up_conv``, input ``cat([upsampled, skip])``): in both the backbone is the first ``in − out`` channels of
    the stage's first convolution.
    Shape: returns ``(name, module, backbone_channels)`` per stage, in forward order.

    Raises:
        InputError: a module without either decoder.
    """
    named = dict(module.named_modules())
    name_of = {id(m): n for n, m in named.items()}
    stages = []
    for candidate in named.values():
        stage_list = getattr(candidate, "decoder", None) or getattr(candidate, "up_conv", None)
        if isinstance(stage_list, nn.ModuleList) and len(stage_list) > 0:
            for stage in stage_list:
                first = stage[0] if isinstance(stage, (nn.ModuleList, nn.Sequential)) else stage
                conv = next((m for m in first.modules() if isinstance(m, nn.Conv2d)), None)
                if conv is None or conv.in_channels <= conv.out_channels:
                    break
                stages.append((name_of[id(first)], first, conv.in_channels - conv.out_channels))
            if stages:
                return stages
    raise InputError(f"calibration family 'freeu': {type(module).__name__} has no decoder whose stages take "
                     f"cat([backbone, skip]) (expected a 'decoder' or 'up_conv' module list).")


class FreeU(_LayerGains):
    """FreeU-like: per decoder stage, a gain on the backbone features and one on the skip's low frequencies.

    Maths: the stage's input ``[h, s]`` ← ``[(1 + b) h, s + c · Re(IFFT2(W_low ⊙ FFT2(s)))]``, ``W_low`` the
    lower of two radial bands on the map's grid.
    Shape: ``gamma`` ``(S, 2)`` = ``[b_s, c_s]``.
    """

    family = "freeu"

    def __init__(self, module: nn.Module) -> None:
        stages = decoder_stages(module)
        self.__dict__["_split"] = [c for _, _, c in stages]
        super().__init__(module, [(n, m) for n, m, _ in stages], 2)

    def _hooks(self) -> list[Any]:
        return [layer.register_forward_pre_hook(functools.partial(self._pre_hook, i))
                for i, layer in enumerate(self.__dict__["_layers"])]

    def _pre_hook(self, index: int, _layer: nn.Module, args: tuple) -> tuple:
        x = args[0]
        c = self.__dict__["_split"][index]
        h, s = x[:, :c], x[:, c:]
        b, g = self.gamma[index, 0].to(x.dtype), self.gamma[index, 1].to(x.dtype)
        low = _low_pass(int(x.shape[-2]), int(x.shape[-1]), x.device, torch.float32)
        s_low = torch.fft.ifft2(torch.fft.fft2(s.float()) * low).real.to(x.dtype)
        return (torch.cat([h * (1.0 + b), s + g * s_low], dim=1), *args[1:])


class _PerLevel(Calibration):
    """Families whose variables depend on the noise-level block of ``σ`` (``sigma_range``: the schedule's
    ``(σ_start, σ_end)``)."""

    def __init__(self, module: nn.Module, shape: Sequence[int], sigma_range: tuple[float, float]) -> None:
        start, end = (float(v) for v in sigma_range)
        if not (start > end > 0):
            raise InputError(f"calibration family {self.family!r}: sigma_range must be (sigma_start, sigma_end) "
                             f"with sigma_start > sigma_end > 0, got {sigma_range!r}.")
        if not callable(getattr(module, "denoise", None)):
            raise InputError(f"calibration family {self.family!r} acts on a denoiser; {type(module).__name__} has "
                             f"no denoise(x, sigma).")
        self.sigma_range = (start, end)
        super().__init__(module, shape)

    def _block(self, sigma: float | torch.Tensor, blocks: int) -> int:
        return level_block(sigma, self.sigma_range, blocks)

    def _denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``D_γ(x, s)`` while attached; detached, the prior's own ``D(x, s)`` (as the hook families)."""
        if not self.attached:
            return self.module.denoise(x, sigma)
        return self._level_denoise(x, sigma)

    def _level_denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _residual_correction(x: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``d + IFFT2(G ⊙ FFT2(d − x))``, ``G = Σ_b γ_b W_b`` on the image grid (``B = len(gamma)`` radial bands).

    Shape: ``x``, ``d`` complex ``(N, 1, H, W)``; ``gamma`` ``(B,)``. ``γ = 0``: ``d + 0``, exactly ``d``."""
    bands = _radial_bands_cached(int(d.shape[-2]), int(d.shape[-1]), default_band_edges(int(gamma.numel())),
                                 str(d.device), torch.float32)
    gain = torch.tensordot(gamma.float(), bands, dims=1)
    return d + torch.fft.ifft2(torch.fft.fft2(d - x) * gain)


class ResidualBands(_PerLevel):
    """The denoiser's frequency response per noise-level block, in image space.

    Maths: ``D_γ(x, s) = D(x, s) + IFFT2((Σ_b γ[k(s), b] W_b) ⊙ FFT2(D(x, s) − x))`` (complex images; the bands
    of :func:`recon.adapt.calibration.radial_bands` on the image grid).
    Shape: ``gamma`` ``(K, B)``.
    """

    family = "residual_bands"

    def __init__(self, module: nn.Module, sigma_range: tuple[float, float], blocks: int = 10,
                 bands: int = 8) -> None:
        self.blocks, self.bands = int(blocks), int(bands)
        super().__init__(module, (self.blocks, self.bands), sigma_range)

    def _level_denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        d = self.module.denoise(x, sigma)
        return _residual_correction(x.to(d.dtype), d, self.gamma[self._block(sigma, self.blocks)])


class SigmaIn(_PerLevel):
    """The noise level the network is told, per level block: ``D_γ(x, s) = D(x, s · exp(γ_{k(s)}))``.

    Shape: ``gamma`` ``(K,)``.
    """

    family = "sigma_in"

    def __init__(self, module: nn.Module, sigma_range: tuple[float, float], blocks: int = 20) -> None:
        self.blocks = int(blocks)
        super().__init__(module, (self.blocks,), sigma_range)

    def _level_denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return self.module.denoise(x, sigma * self.gamma[self._block(sigma, self.blocks)].exp())


class SigmaResidual(_PerLevel):
    """:class:`SigmaIn` (``K₁`` blocks) and :class:`ResidualBands` (``K₂ × B``) together.

    Shape: ``gamma`` ``(K₁ + K₂·B,)``: the ``K₁`` level factors first.
    """

    family = "sigma_residual"

    def __init__(self, module: nn.Module, sigma_range: tuple[float, float], sigma_blocks: int = 10,
                 blocks: int = 10, bands: int = 8) -> None:
        self.sigma_blocks, self.blocks, self.bands = int(sigma_blocks), int(blocks), int(bands)
        super().__init__(module, (self.sigma_blocks + self.blocks * self.bands,), sigma_range)

    def _level_denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        factor = self.gamma[self._block(sigma, self.sigma_blocks)].exp()
        d = self.module.denoise(x, sigma * factor)
        residual = self.gamma[self.sigma_blocks:].reshape(self.blocks, self.bands)
        return _residual_correction(x.to(d.dtype), d, residual[self._block(sigma, self.blocks)])


FAMILIES: tuple[str, ...] = ("bands", "conv_gain", "norm_affine", "freeu", "residual_bands", "sigma_in",
                             "sigma_residual")
"""The calibration families :func:`make_calibration` builds."""


@dataclass(frozen=True)
class CalibrationShape:
    """What a calibration is, apart from its values: the family and its sizes (a saved γ fits only the same shape).

    Attributes:
        family: one of :data:`FAMILIES`; layers / bands / band_edges: the ``bands`` family's shape;
        sigma_range: the schedule's ``(σ_start, σ_end)`` that the per-level families split into blocks.
        below: the calibration acts at noise levels ``σ ≤ below`` only (``biasrecon.calibrate_below``; None: all).
    """

    family: str = "bands"
    layers: int = 24
    bands: int = 3
    band_edges: tuple[float, ...] | None = None
    sigma_range: tuple[float, float] = (0.5, 0.01)
    below: float | None = None

    def build(self, module: nn.Module) -> nn.Module:
        """The calibration of ``module`` with this shape (γ = 0, not attached)."""
        return make_calibration(self.family, module, sigma_range=self.sigma_range, layers=self.layers,
                                bands=self.bands, band_edges=self.band_edges, below=self.below)


def make_calibration(family: str, module: nn.Module, *, sigma_range: tuple[float, float] = (0.5, 0.01),
                     layers: int = 24, bands: int = 3, band_edges: Sequence[float] | None = None,
                     below: float | None = None) -> nn.Module:
    """Build a calibration of ``family`` for ``module`` (not attached).

    ``layers`` / ``bands`` / ``band_edges``: the ``bands`` family's shape; ``sigma_range``: the schedule's
    ``(σ_start, σ_end)`` for the per-level families; ``below``: the calibration acts at ``σ ≤ below`` only
    (:meth:`Calibration.acts_at`; the callers' denoisers use the prior as trained above it).

    Raises:
        InputError: an unknown family, a module the family cannot hook, more than 99 variables, or a ``below``
            that is not a positive number.
    """
    require_module(module)
    if below is not None and not (isinstance(below, (int, float)) and not isinstance(below, bool)
                                  and math.isfinite(below) and below > 0):
        raise InputError(f"calibration: below must be None or a positive number, got {below!r}.")
    calibration = _family(family, module, sigma_range, layers, bands, band_edges)
    calibration.below = None if below is None else float(below)
    return calibration


def _family(family: str, module: nn.Module, sigma_range: tuple[float, float], layers: int, bands: int,
            band_edges: Sequence[float] | None) -> nn.Module:
    if family == "bands":
        return FrequencyCalibration(module, layers="auto", num_layers=layers, bands=bands, band_edges=band_edges)
    if family == "conv_gain":
        return ConvGain(module)
    if family == "norm_affine":
        return NormAffine(module)
    if family == "freeu":
        return FreeU(module)
    if family == "residual_bands":
        return ResidualBands(module, sigma_range)
    if family == "sigma_in":
        return SigmaIn(module, sigma_range)
    if family == "sigma_residual":
        return SigmaResidual(module, sigma_range)
    raise InputError(f"calibration family is {family!r}, expected one of {', '.join(FAMILIES)}.")


class CalibratedPrior:
    """A prior with a fixed calibration γ, as a value: ``denoise`` is the calibrated denoiser ``D_γ``.

    Mode site and reused site profiles pass this on wherever a prior goes (the optimizer, a method): nothing is
    attached to the wrapped module outside a :meth:`denoise` call, so the same module serves other methods
    uncalibrated in between.
    Shape: as the prior's ``denoise``; ``gamma`` the family's shape (``(L, B)`` for ``bands``).

    Args:
        module: the prior (an ``nn.Module`` with ``denoise(x, sigma)``).
        gamma: the fixed γ (copied).
        shape: the calibration's :class:`CalibrationShape` (default: the band gains, 24 layers × 3 bands).

    Raises:
        InputError: a γ that does not fit the calibration's shape, or non-finite values.
    """

    def __init__(self, module: nn.Module, gamma: torch.Tensor, shape: CalibrationShape = CalibrationShape(),
                 source: str = "calibrated prior") -> None:
        self.shape = shape
        self.calibration = shape.build(module)
        self.calibration._load_gamma(torch.as_tensor(gamma).detach().cpu(), source)
        self.calibration.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The wrapped prior."""
        return self.calibration.module

    @property
    def gamma(self) -> torch.Tensor:
        """A copy of the fixed γ."""
        return self.calibration.gamma.detach().clone()

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The calibrated denoiser: the calibration is attached for this call only (the prior as trained at
        levels the calibration does not act at, :meth:`Calibration.denoise`)."""
        with self.calibration:
            return self.calibration.denoise(x, sigma)
