"""recon.bench: the synthetic slice is what its docstring says, and each measurement runs a small case end to end
(the tables' numbers are timings, checked for shape and sign only)."""

from __future__ import annotations

import torch
from torch import nn

from recon.bench import MEMORY_CASES, memory_case, memory_markdown, pipeline, pipeline_markdown, synthetic_slice
from scores.samplers import TweedieSampler  # the sampler loop (recon sees it through a Protocol)


class SmoothingPrior(nn.Module):
    """A tiny frozen denoiser, two constant 3×3 convolutions on (real, imaginary) around a GroupNorm: what the γ
    calibration hooks (the default family scales and shifts the norm's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 3, padding=1))
        for layer in (self.net[0], self.net[2]):
            for weight in layer.parameters():
                nn.init.constant_(weight, 1 / 36)
        self.requires_grad_(False)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = self.net(torch.view_as_real(x[:, 0]).permute(0, 3, 1, 2).float())
        return torch.complex(out[:, 0], out[:, 1])[:, None]


def test_synthetic_slice_is_seeded_normalised_and_sampled_on_its_mask():
    maps, mask, y = synthetic_slice(3, 40, 48, seed=1)
    assert maps.shape == (1, 3, 40, 48) and y.shape == (1, 3, 40, 48) and mask.shape == (40, 48)
    assert maps.dtype == y.dtype == torch.complex64 and mask.dtype == torch.float32
    torch.testing.assert_close(torch.sum(maps.abs() ** 2, dim=1), torch.ones(1, 40, 48))
    columns = mask[0]
    assert bool(columns[::4].all()) and bool(columns[24 - 12: 24 + 12].all()) and float(columns.sum()) < 48
    assert bool((y[..., mask == 0] == 0).all())
    for got, again in zip((maps, mask, y), synthetic_slice(3, 40, 48, seed=1)):
        assert torch.equal(got, again)
    assert not torch.equal(y, synthetic_slice(3, 40, 48, seed=2)[2])


def test_memory_case_loads_the_prior_through_the_loader_and_records_every_field(single_thread):
    calls = []

    def load(device: torch.device, checkpointing: bool) -> SmoothingPrior:
        calls.append((device.type, checkpointing))
        return SmoothingPrior()

    for case, (adapt, checkpointing) in MEMORY_CASES.items():
        record = memory_case(case, torch.device("cpu"), 2, 24, 24, 2, 1, None, load, TweedieSampler())
        assert record["error"] is None and (record["adapt"], record["checkpointing"]) == (adapt, checkpointing)
        assert record["peak_mb"] >= record["peak_before_mb"] > 0 and record["seconds"] > 0
    assert calls == [("cpu", c) for _, c in MEMORY_CASES.values()]
    table = memory_markdown([record], torch.device("cpu"), "2,24,24", 2, 1, None, "python scripts/benchmark.py memory")
    assert "2-coil 24×24" in table and "Command: `python scripts/benchmark.py memory`" in table
    assert table.count("\n| ") == 2  # the header row and the one record


def test_pipeline_times_the_three_methods(single_thread):
    rows = pipeline(SmoothingPrior(), TweedieSampler(), torch.device("cpu"), 2, 24, 24, 2, 1)
    assert [name for name, _, _ in rows] == ["unadapted (fixed λ)", "unadapted + SURE", "BiasRecon (γ + SURE)"]
    assert all(seconds > 0 and peak > 0 for _, seconds, peak in rows)
    table = pipeline_markdown(rows, torch.device("cpu"), "2,24,24", 2, 1, "python scripts/benchmark.py pipeline")
    assert "1 slice(s) of 2×24×24, 2 noise levels" in table and table.count("\n| ") == 4
