"""LoRA on convolutions: exact identity at B = 0, parity with merged weights, parameter count, detach, fitting."""

from __future__ import annotations

import copy

import pytest
import torch
from fastmri.models import Unet
from torch import nn

from recon.adapt.lora import LoRA, conv_layers
from recon.errors import InputError


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny convolutions: one thread (tests/conftest.py)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # test-only: fixes nn.Conv2d's default init
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 2, 1)).eval()


def test_identity_at_start_and_after_detach() -> None:
    net = _net()
    x = torch.randn(2, 2, 17, 12, generator=torch.Generator().manual_seed(1))
    before = net(x)
    lora = LoRA(net, rank=2, generator=torch.Generator().manual_seed(0)).attach()
    assert torch.equal(net(x), before)  # B = 0: bit for bit
    with torch.no_grad():
        for p in lora.up:
            p.normal_()
    assert not torch.allclose(net(x), before)
    lora.detach()
    assert torch.equal(net(x), before) and not lora.attached


def test_hooked_output_equals_the_network_with_merged_weights() -> None:
    net = _net().double()
    lora = LoRA(net, rank=2, alpha=3.0, generator=torch.Generator().manual_seed(0)).double().attach()
    with torch.no_grad():
        for p in lora.up:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.shape[0]), dtype=torch.float64))
    lora.detach()
    merged = copy.deepcopy(net)  # without the hooks
    layers = dict(merged.named_modules())
    with torch.no_grad():
        for i, name in enumerate(lora.layer_names):
            layers[name].weight += lora.delta(i)
    lora.attach()
    x = torch.randn(3, 2, 16, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(net(x), merged(x), rtol=1e-12, atol=1e-12)


def test_parameter_count_and_layer_choice() -> None:
    net = _net()
    lora = LoRA(net, rank=2)
    expected = sum(2 * (m.weight[0].numel() + m.out_channels) for m in net.modules() if isinstance(m, nn.Conv2d))
    assert lora.num_variables == expected and len(lora.layer_names) == 4
    unet = Unet(2, 2, chans=8, num_pool_layers=2)
    assert LoRA(unet, rank=4).layer_names == tuple(conv_layers(unet))
    one = LoRA(net, layers=["2"], rank=1)
    assert one.num_variables == 1 * (8 * 9 + 8)
    for bad in (["1"], ["nope"], []):
        with pytest.raises(InputError, match="lora"):
            LoRA(net, layers=bad)
    with pytest.raises(InputError, match="rank"):
        LoRA(net, rank=0)


def test_gradients_reach_only_the_factors_and_fit_a_target() -> None:
    net = _net()
    for p in net.parameters():
        p.requires_grad_(False)
    target_net = _net(seed=1)
    lora = LoRA(net, rank=4, generator=torch.Generator().manual_seed(0)).attach()
    x = torch.randn(4, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = target_net(x)
    opt = torch.optim.Adam(lora.parameters(), lr=1e-2)
    with torch.no_grad():
        start = float(((net(x) - y) ** 2).mean())
    for _ in range(100):
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in net.parameters())
    assert float(loss.detach()) < 0.5 * start
    lora.reset()
    assert torch.equal(net(x), _net()(x))
