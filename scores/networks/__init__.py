"""Score networks: plain ``nn.Module``s on real channel tensors (no complex numbers, no sigma logic)."""

from scores.networks.unet import FourierEmbedding, ResBlock, SelfAttention, UNet, count_parameters

__all__ = ["UNet", "ResBlock", "SelfAttention", "FourierEmbedding", "count_parameters"]
