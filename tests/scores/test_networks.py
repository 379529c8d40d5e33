"""U-Net: any image size through padding, blocks for hooks, seeded init, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scores.networks import UNet, count_parameters


def _net(**kw: object) -> UNet:
    cfg = dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attention=True)
    cfg.update(kw)
    net = UNet(**cfg)  # type: ignore[arg-type]
    net.reset_parameters(torch.Generator().manual_seed(0))
    # zero-initialised layers make the output 0; perturb them so outputs depend on every layer
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (3, 2), (1, 1), (17, 12)])
def test_any_size_is_padded_and_cropped_back(size: tuple[int, int]) -> None:
    """With zero padding, running on an odd size equals running on the zero-padded image and cropping."""
    net = _net(pad_mode="zeros")
    h, w = size
    x = torch.randn(2, 2, h, w, generator=torch.Generator().manual_seed(2))
    c = torch.tensor([0.3, -0.7])
    out = net(x, c)
    assert out.shape == (2, 2, h, w) and torch.isfinite(out).all()
    ph, pw = (-h) % 4, (-w) % 4
    padded = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    ref = net(padded, c)[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_reflect_padding_handles_tiny_images() -> None:
    out = _net(pad_mode="reflect")(torch.randn(1, 2, 2, 3), torch.zeros(1))
    assert out.shape == (1, 2, 2, 3) and torch.isfinite(out).all()


def test_blocks_are_listed_in_forward_order() -> None:
    net = _net()
    order: list[int] = []
    handles = [blk.register_forward_hook(lambda m, i, o, k=k: order.append(k)) for k, blk in enumerate(net.blocks)]
    net(torch.randn(1, 2, 8, 8), torch.zeros(1))
    for h in handles:
        h.remove()
    # 3 levels x 1 encoder block + 2 middle + 3 levels x 1 decoder block
    assert order == list(range(8)) and len(net.blocks) == 8


def test_noise_condition_changes_output() -> None:
    net = _net()
    x = torch.randn(1, 2, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0.0])), net(x, torch.tensor([1.0])))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = UNet(base_channels=8, channel_mults=(1, 2)), UNet(base_channels=8, channel_mults=(1, 2)), UNet(
        base_channels=8, channel_mults=(1, 2)
    )
    torch.random.set_rng_state(state)
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    c.reset_parameters(torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # zero-initialised output: a fresh network outputs exactly 0
    assert torch.count_nonzero(a(torch.randn(1, 2, 8, 8), torch.zeros(1))) == 0


def test_gradient_checkpointing_gives_same_gradients() -> None:
    x = torch.randn(2, 2, 12, 12, generator=torch.Generator().manual_seed(5))
    c = torch.tensor([0.1, 0.2])
    grads = []
    for flag in (False, True):
        net = _net(gradient_checkpointing=flag).train()
        net.zero_grad()
        net(x, c).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_parameter_counts_of_bundled_sizes() -> None:
    assert 40_000 < count_parameters(UNet(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                                          attention=False, emb_channels=32)) < 60_000
    big = UNet(base_channels=32, channel_mults=(1, 2, 2, 4), num_res_blocks=2, attention=True, emb_channels=128)
    assert 2_000_000 < count_parameters(big) < 6_000_000
