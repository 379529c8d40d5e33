"""ScoreModel: the denoiser ``D(x, sigma)`` and score of complex images around a real U-Net.

This module is the only place that packs complex images into real channels
(:func:`complex_to_channels` / :func:`channels_to_complex`) and the only place that turns a
denoiser output into a score (:func:`score_from_denoised`).

Noise convention: ``x = x0 + sigma * (n_re + i n_im)``, ``n_re, n_im ~ N(0, 1)`` independent, i.e.
per-real-channel standard deviation ``sigma`` (``E|z|^2 = 2``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scores.config import NetworkConfig
from scores.networks.unet import ResBlock, UNet

__all__ = [
    "ScoreModel",
    "complex_to_channels",
    "channels_to_complex",
    "score_from_denoised",
    "complex_noise",
    "sigma_as_batch",
]


def complex_to_channels(x: Tensor) -> Tensor:
    """Pack a complex image into real and imaginary channels.

    Maths: ``x -> [Re x, Im x]``.
    Shape: complex ``(B, 1, H, W)`` -> real ``(B, 2, H, W)``.
    """
    return torch.cat([x.real, x.imag], dim=1)


def channels_to_complex(x: Tensor) -> Tensor:
    """Inverse of :func:`complex_to_channels`.

    Maths: ``[a, b] -> a + i b``.
    Shape: real ``(B, 2, H, W)`` -> complex64 ``(B, 1, H, W)``.
    """
    x = x.float()
    return torch.complex(x[:, 0:1], x[:, 1:2])


def score_from_denoised(denoised: Tensor, x: Tensor, sigma: float | Tensor) -> Tensor:
    """Score of the sigma-smoothed density from its MMSE denoiser (Tweedie).

    Maths: ``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (gradient w.r.t. real and imaginary parts,
    packed as a complex number).
    Shape: complex ``(B, 1, H, W)``; ``sigma`` a float or ``(B,)``.
    """
    s = sigma_as_batch(sigma, x)
    return (denoised - x) / s[:, None, None, None] ** 2


def complex_noise(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> Tensor:
    """Complex standard noise with per-real-channel variance 1: the one draw of the samplers and training.

    Maths: ``z = n_re + i n_im``, ``n_re, n_im ~ N(0, 1)``.
    Shape: ``shape`` complex64 on ``device``. Drawn on the generator's device and then moved, so a
    CPU generator gives the same numbers for data on any device.
    """
    source = generator.device if generator is not None else device
    pair = torch.randn((*shape, 2), generator=generator, device=source, dtype=torch.float32)
    return torch.view_as_complex(pair).to(device)


def sigma_as_batch(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Broadcast a noise level to one float32 value per batch element.

    Shape: float, 0-d or ``(B,)`` -> ``(B,)`` on ``x``'s device.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a tensor of shape ({x.shape[0]},), got shape {tuple(s.shape)}.")
    return s


class ScoreModel(nn.Module):
    """EDM-preconditioned denoiser and score of complex MR images.

    The model expects complex images normalised so that the 99th percentile of the magnitude of
    their low-resolution (centre-of-k-space) image is 1 (done by the data side with
    ``recon.data.normalize.normalization_scale``, the same for training and reconstruction); it
    never rescales its input.

    Maths (Karras et al. 2022), with ``s`` the per-real-channel noise std and ``sd = sigma_data``:
    ``D(x, s) = c_skip x + c_out F([c_in x], c_noise)``, ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``;
    ``score(x, s) = (D(x, s) - x) / s^2``.
    Shape: complex64 ``(B, 1, H, W)`` in and out; ``sigma`` a float or ``(B,)``.

    Args:
        network: a real network ``F(x: (B, 2, H, W), c_noise: (B,)) -> (B, 2, H, W)``.
        sigma_data: per-real-channel standard deviation of the (normalised) training images.
    """

    def __init__(self, network: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
        self.network = network
        self.sigma_data = float(sigma_data)

    @property
    def blocks(self) -> list[nn.Module]:
        """The network's blocks in forward order (for frequency-calibration hooks)."""
        blocks = getattr(self.network, "blocks", None)
        if blocks is None:
            return [m for m in self.network.modules() if isinstance(m, ResBlock)]
        return list(blocks)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the network recomputes its blocks in the backward pass (see :meth:`set_gradient_checkpointing`)."""
        return bool(getattr(self.network, "gradient_checkpointing", False))

    def set_gradient_checkpointing(self, enabled: bool) -> "ScoreModel":
        """Turn the network's gradient checkpointing on or off; returns ``self``.

        Trades compute for memory when gradients flow through the denoiser (training, test-time
        calibration of ``γ``): the blocks' activations are recomputed in the backward pass instead
        of being stored (:meth:`scores.networks.UNet.set_gradient_checkpointing`). Outputs and
        gradients are unchanged, and so are the weights, the ``state_dict`` and the checkpoint
        format; under ``torch.no_grad()`` nothing changes at all.

        Raises:
            TypeError: the network has no ``set_gradient_checkpointing(enabled)`` method.
        """
        setter = getattr(self.network, "set_gradient_checkpointing", None)
        if not callable(setter):
            raise TypeError(
                f"ScoreModel.set_gradient_checkpointing: the network {type(self.network).__name__} has no "
                "set_gradient_checkpointing(enabled) method; expected a scores.networks.UNet or a network that has one."
            )
        setter(bool(enabled))
        return self

    def _check_input(self, x: Tensor) -> None:
        if not torch.is_complex(x) or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(
                "ScoreModel expects a complex tensor of shape (batch, 1, H, W), "
                f"got {x.dtype} of shape {tuple(x.shape)}."
            )

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM coefficients ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma``; each ``(B,)``."""
        sd2 = self.sigma_data**2
        var = sigma**2 + sd2
        c_skip = sd2 / var
        c_out = sigma * self.sigma_data / var.sqrt()
        c_in = 1.0 / var.sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip, c_out, c_in, c_noise

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """MMSE estimate of the clean image ``E[x0 | x0 + sigma z = x]``.

        Maths: ``D(x, s) = c_skip x + c_out F(c_in x, log(s) / 4)``.
        Shape: complex ``(B, 1, H, W)`` -> complex64 ``(B, 1, H, W)``; ``sigma`` float or ``(B,)``.
        """
        self._check_input(x)
        x = x.to(torch.complex64)
        s = sigma_as_batch(sigma, x)
        if torch.any(s <= 0):
            raise ValueError("sigma must be positive.")
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in self.preconditioning(s))
        f = self.network(complex_to_channels(x) * c_in, c_noise.flatten())
        return c_skip * x + c_out * channels_to_complex(f)

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Same as :meth:`denoise` (so that wrappers such as DDP route through it)."""
        return self.denoise(x, sigma)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Score ``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2``.

        Shape: complex ``(B, 1, H, W)`` -> complex64 ``(B, 1, H, W)``.
        """
        return score_from_denoised(self.denoise(x, sigma), x.to(torch.complex64), sigma)

    @classmethod
    def from_config(cls, network_cfg: NetworkConfig, generator: torch.Generator | None = None) -> "ScoreModel":
        """Build a ScoreModel with a :class:`~scores.networks.UNet` from a ``NetworkConfig``.

        Args:
            network_cfg: a :class:`scores.config.NetworkConfig`.
            generator: seeds the initial weights (without touching the global random state); None
                keeps PyTorch's default initialisation.
        """
        cfg = network_cfg
        unet = UNet(
            in_channels=2,
            out_channels=2,
            base_channels=cfg.base_channels,
            channel_mults=tuple(cfg.channel_mults),
            num_res_blocks=cfg.num_res_blocks,
            attention=cfg.attention,
            emb_channels=cfg.emb_channels,
            pad_mode=cfg.pad_mode,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
        if generator is not None:
            unet.reset_parameters(generator)
        return cls(unet, sigma_data=cfg.sigma_data)

