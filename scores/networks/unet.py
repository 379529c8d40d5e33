"""A compact noise-conditional U-Net for real 2-channel images (complex images packed by scores.model).

GroupNorm + SiLU residual blocks, a Fourier-feature embedding of the noise condition added in every
block, one optional self-attention at the lowest resolution, and padding to a multiple of
``2 ** (levels - 1)`` so any ``H, W`` work (the output is cropped back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["UNet", "ResBlock", "SelfAttention", "FourierEmbedding", "count_parameters"]


def _num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Largest group count <= max_groups dividing ``channels`` with at least ``min_group_size`` channels each."""
    for groups in range(min(max_groups, max(1, channels // min_group_size)), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class FourierEmbedding(nn.Module):
    """Fourier features of the scalar noise condition, followed by a 2-layer MLP.

    Maths: ``e(c) = MLP([cos(w_k c), sin(w_k c)]_k)``, ``w_k`` geometric in ``[1, max_frequency]``.
    Shape: ``(B,) -> (B, emb_channels)``.
    """

    def __init__(self, emb_channels: int, num_frequencies: int = 32, max_frequency: float = 64.0) -> None:
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), num_frequencies))
        self.register_buffer("frequencies", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_frequencies, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        """Embed ``c_noise`` of shape ``(B,)`` into ``(B, emb_channels)``."""
        angles = c_noise.to(self.frequencies.dtype)[:, None] * self.frequencies[None, :]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class ResBlock(nn.Module):
    """Residual block with additive noise embedding.

    Maths: ``h = conv2(silu(gn2(conv1(silu(gn1(x))) + W e))); out = skip(x) + h``.
    Shape: ``(B, in_channels, H, W), (B, emb) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(_num_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block; see the class docstring for shapes."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head-per-32-channels self-attention over pixels, residual.

    Maths: ``out = x + proj(softmax(q k^T / sqrt(d)) v)`` with ``q, k, v = 1x1 convs of gn(x)``.
    Shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // 32)
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all ``H * W`` positions."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class _Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Noise-conditional U-Net on real images of any size.

    Maths: ``F_theta(x, c_noise)``; the network is unaware of complex numbers and of sigma; scores.model
    applies the preconditioning ``D(x, s) = c_skip x + c_out F(c_in x, c_noise(s))``.
    Shape: ``(B, in_channels, H, W), (B,) -> (B, out_channels, H, W)``, any ``H, W >= 1``.

    Args:
        in_channels: input channels (2 for a packed complex image).
        out_channels: output channels.
        base_channels: channels at the finest level.
        channel_mults: channel multiplier per level; ``len(channel_mults) - 1`` downsamplings.
        num_res_blocks: residual blocks per level in the encoder and in the decoder.
        attention: one self-attention in the middle (lowest resolution).
        emb_channels: width of the noise embedding (0 means ``4 * base_channels``).
        pad_mode: "reflect", "replicate" or "zeros" padding up to a multiple of ``2 ** (levels - 1)``;
            reflect falls back to replicate where the image is smaller than the padding.
        gradient_checkpointing: recompute the residual blocks and the attention in the backward pass
            instead of storing their activations (see :meth:`set_gradient_checkpointing`).

    Attributes:
        blocks: the residual blocks in forward order (encoder, middle, decoder); their outputs are the
            feature maps that frequency calibration hooks into.
        gradient_checkpointing: whether activation recomputation is on (a plain flag: not part of the
            ``state_dict``, so checkpoints are the same with and without it).
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention: bool = True,
        emb_channels: int = 0,
        pad_mode: str = "reflect",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pad_mode not in ("reflect", "replicate", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect', 'replicate' or 'zeros', got {pad_mode!r}.")
        if len(channel_mults) < 1 or num_res_blocks < 1 or base_channels < 1:
            raise ValueError("UNet needs at least one level, one residual block and one base channel.")
        emb_channels = emb_channels or 4 * base_channels
        self.pad_mode = pad_mode
        self.num_levels = len(channel_mults)
        self.embedding = FourierEmbedding(emb_channels)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        widths = [base_channels * m for m in channel_mults]
        self.encoder = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        channels = base_channels
        for level, width in enumerate(widths):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.append(ResBlock(channels, width, emb_channels))
                channels = width
            self.encoder.append(stage)
            if level < self.num_levels - 1:
                self.downsamplers.append(_Downsample(channels))

        self.middle1 = ResBlock(channels, channels, emb_channels)
        self.attention = SelfAttention(channels) if attention else None
        self.middle2 = ResBlock(channels, channels, emb_channels)

        self.decoder = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            width = widths[level]
            stage = nn.ModuleList()
            stage.append(ResBlock(channels + width, width, emb_channels))  # concatenated skip of this level
            for _ in range(num_res_blocks - 1):
                stage.append(ResBlock(width, width, emb_channels))
            channels = width
            self.decoder.append(stage)
            if level > 0:
                self.upsamplers.append(_Upsample(channels))

        self.output_norm = nn.GroupNorm(_num_groups(channels), channels)
        self.output_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.set_gradient_checkpointing(gradient_checkpointing)
        self._zero_init()

    @property
    def blocks(self) -> list[ResBlock]:
        """Residual blocks in forward order (encoder, middle, decoder)."""
        out: list[ResBlock] = [blk for stage in self.encoder for blk in stage]  # type: ignore[misc]
        out += [self.middle1, self.middle2]
        out += [blk for stage in self.decoder for blk in stage]  # type: ignore[misc]
        return out

    def set_gradient_checkpointing(self, enabled: bool) -> "UNet":
        """Turn activation recomputation of the residual blocks and the attention on or off. Returns ``self``.

        When on, each residual block and the self-attention run under
        ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` whenever autograd records
        (``torch.is_grad_enabled()``), in training and in eval mode alike: only the block's inputs
        are kept for the backward pass and its inside is recomputed there. The whole module call is
        recomputed, forward hooks included, so a hook's own saved tensors (e.g. the FFTs of
        ``recon.adapt.FrequencyCalibration``) are not stored either, and gradients still reach
        tensors the hooks close over (``γ``). Outputs and gradients are the same as without it; the
        cost is one more forward of each block per backward. Under ``torch.no_grad()`` /
        ``torch.inference_mode()`` the blocks run plainly, so sampling is unaffected.
        """
        self.gradient_checkpointing = bool(enabled)
        return self

    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        """``module(*args)``, recomputed in the backward pass when gradient checkpointing is active."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _zero_init(self) -> None:
        """Zero the last conv of each residual branch, the attention projection and the output conv.

        Each block then starts as its skip path and the network output starts at 0 (so the denoiser
        starts as ``c_skip x``), which stabilises early training.
        """
        zero = [blk.conv2 for blk in self.blocks] + [self.output_conv]
        if self.attention is not None:
            zero.append(self.attention.proj)
        for conv in zero:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-initialise every conv and linear layer from ``generator`` (PyTorch's default scheme), then zero-init.

        Makes initialisation reproducible without touching the global random state.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self._zero_init()

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        multiple = 2 ** (self.num_levels - 1)
        h, w = x.shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
        if ph == 0 and pw == 0:
            return x, pads
        mode = self.pad_mode
        if mode == "reflect" and (max(pads[0], pads[1]) >= w or max(pads[2], pads[3]) >= h):
            mode = "replicate"
        if mode == "zeros":
            return F.pad(x, pads), pads
        return F.pad(x, pads, mode=mode), pads

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """Run the U-Net.

        Args:
            x: real input, shape ``(B, in_channels, H, W)``.
            c_noise: noise condition, shape ``(B,)``.

        Returns:
            Real output, shape ``(B, out_channels, H, W)``.
        """
        h_in, w_in = x.shape[-2:]
        x, pads = self._pad(x)
        emb = self.embedding(c_noise)
        h = self.input_conv(x)
        skips = []
        for level, stage in enumerate(self.encoder):
            for blk in stage:
                h = self._run(blk, h, emb)
            skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamplers[level](h)
        h = self._run(self.middle1, h, emb)
        if self.attention is not None:
            h = self._run(self.attention, h)
        h = self._run(self.middle2, h, emb)
        for i, stage in enumerate(self.decoder):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in stage:
                h = self._run(blk, h, emb)
            if i < self.num_levels - 1:
                h = self.upsamplers[i](h)
        out = self.output_conv(F.silu(self.output_norm(h)))
        return out[..., pads[2] : pads[2] + h_in, pads[0] : pads[0] + w_in]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
