"""Shared fixtures of the scores/ tests: small synthetic complex images (no recon import)."""

from __future__ import annotations

import math

import pytest
import torch


def blob_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random blobs with a smooth (linear + quadratic) phase, magnitude 99th percentile ~ 1.

    Shape: complex64 ``(count, 1, height, width)``.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    out = []
    for _ in range(count):
        mag = torch.zeros(height, width)
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * 1.2 - 0.6).tolist()
            ry, rx = (torch.rand(2, generator=g) * 0.3 + 0.2).tolist()
            amp = float(torch.rand(1, generator=g)) * 0.7 + 0.3
            mag += amp * torch.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
        a, b, c, q = (torch.randn(4, generator=g) * torch.tensor([1.0, 1.0, math.pi, 0.5])).tolist()
        phase = a * xx + b * yy + c + q * (xx**2 + yy**2)
        img = mag * torch.exp(1j * phase)
        out.append(img / torch.quantile(mag.flatten(), 0.99))
    return torch.stack(out)[:, None].to(torch.complex64)


@pytest.fixture(scope="session")
def blobs16() -> torch.Tensor:
    """32 synthetic 16x16 complex training images."""
    return blob_images(32, 16, 16, seed=0)


@pytest.fixture(scope="session")
def blobs32() -> torch.Tensor:
    """16 synthetic 32x32 complex training images (patch training)."""
    return blob_images(16, 32, 32, seed=1)


@pytest.fixture(scope="session")
def blobs48x40() -> torch.Tensor:
    """4 synthetic whole 48x40 complex images, larger than any training image (validation)."""
    return blob_images(4, 48, 40, seed=2)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test of scores/ on one thread (tests/conftest.py's ``single_thread``)."""
    yield
