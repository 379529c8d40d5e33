"""Low-rank adaptation (LoRA) of a network's convolutions, attached through forward hooks.

The competing test-time adaptation of a diffusion prior (as DDIP / Steerable Conditional Diffusion
adapt one): every selected ``nn.Conv2d`` with weight ``W`` (``C_out × C_in/g × k × k``) gets a
rank-``r`` update ``ΔW = B A`` (``B``: ``C_out × r``, zeros; ``A``: ``r × (C_in/g · k · k)``,
small random), so the layer computes ``conv(x, W + α/r · ΔW)`` — done as a forward hook that adds
``conv(x, α/r · ΔW)`` (same stride, padding, dilation, groups) to the layer's output. ``B = 0`` at
the start, so the adapted network is the pre-trained one bit for bit; the module's own weights are
never touched, and :meth:`LoRA.detach` removes the hooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recon.errors import InputError

__all__ = ["LoRA", "conv_layers"]


def conv_layers(module: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` of ``module`` in ``named_modules`` order (``padding_mode='zeros'`` only).

    Shape: returns dotted module names.
    """
    return [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"]


class LoRA(nn.Module):
    """Rank-``r`` updates of a network's convolutions (hooks; the module is held by reference, not registered).

    Maths: layer ``l``'s output ``conv(x, W_l)`` ← ``conv(x, W_l) + conv(x, (α/r) reshape(B_l A_l))``;
    ``B_l = 0`` at the start (exact identity: ``x + 0 == x``), ``A_l ~ N(0, 1/fan_in)`` from ``generator``.
    Shape: ``A_l`` ``(r, C_in/g · k · k)``, ``B_l`` ``(C_out, r)``; ``num_parameters = Σ_l r (C_in/g k² + C_out)``.

    Args:
        module: Any ``nn.Module``; freeze it yourself so that gradients reach the LoRA factors only.
        layers: ``"all"`` (every zero-padded ``nn.Conv2d``, :func:`conv_layers`) or a list of their names.
        rank: ``r``.
        alpha: Scale ``α`` (the update is ``α/r · BA``).
        generator: Seeds ``A``.

    Raises:
        InputError: a non-convolution or unknown layer name, an empty selection, a rank below 1.
    """

    def __init__(self, module: nn.Module, layers: str | Sequence[str] = "all", rank: int = 4, alpha: float = 4.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise InputError(f"lora: module must be a torch.nn.Module, got {type(module).__name__}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InputError(f"lora: rank must be a positive integer, got {rank!r}.")
        by_name = dict(module.named_modules())
        if isinstance(layers, str):
            if layers != "all":
                raise InputError(f"lora: layers must be 'all' or a list of convolution names, got {layers!r}.")
            names = conv_layers(module)
        else:
            names = list(layers)
        if not names:
            raise InputError(f"lora: {type(module).__name__} has no nn.Conv2d to adapt; expected convolution layers.")
        for name in names:
            layer = by_name.get(name)
            if not isinstance(layer, nn.Conv2d) or layer.padding_mode != "zeros":
                raise InputError(f"lora: layer {name!r} is not a zero-padded nn.Conv2d of {type(module).__name__}.")
        self.__dict__["_module"] = module
        self.__dict__["_layers"] = [by_name[n] for n in names]
        self.__dict__["_handles"] = []
        self.layer_names: tuple[str, ...] = tuple(names)
        self.rank, self.scale = rank, float(alpha) / rank
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for layer in self.__dict__["_layers"]:
            fan_in = layer.weight[0].numel()
            a = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
            self.down.append(nn.Parameter(a.to(layer.weight.dtype)))
            self.up.append(nn.Parameter(torch.zeros(layer.out_channels, rank, dtype=layer.weight.dtype)))

    @property
    def module(self) -> nn.Module:
        """The adapted module."""
        return self.__dict__["_module"]

    @property
    def num_variables(self) -> int:
        """Number of adapted values ``Σ_l r (C_in/g · k² + C_out)``."""
        return sum(p.numel() for p in self.parameters())

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self.__dict__["_handles"])

    def delta(self, index: int) -> torch.Tensor:
        """The weight update ``(α/r) B A`` of layer ``index``, shaped like its weight."""
        layer = self.__dict__["_layers"][index]
        return (self.scale * self.up[index] @ self.down[index]).reshape(layer.weight.shape)

    def _hook(self, index: int, layer: nn.Conv2d, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        delta = self.delta(index).to(device=x.device, dtype=x.dtype)
        update = F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return output + update  # B = 0: update ≡ 0 and output + 0 == output

    def attach(self) -> "LoRA":
        """Register the hooks (idempotent). Returns ``self``."""
        if not self.attached:
            for i, layer in enumerate(self.__dict__["_layers"]):
                self.__dict__["_handles"].append(
                    layer.register_forward_hook(lambda m, a, o, i=i: self._hook(i, m, a, o)))
        return self

    def detach(self) -> "LoRA":
        """Remove the hooks: the module computes exactly what it did before :meth:`attach`. Returns ``self``."""
        for handle in self.__dict__["_handles"]:
            handle.remove()
        self.__dict__["_handles"].clear()
        return self

    def reset(self) -> None:
        """``B = 0`` for every layer (the identity), keeping ``A``."""
        with torch.no_grad():
            for p in self.up:
                p.zero_()

    def extra_repr(self) -> str:
        return f"layers={len(self.layer_names)}, rank={self.rank}, variables={self.num_variables}"
