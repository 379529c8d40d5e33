"""Gradient checkpointing of the score U-Net: same outputs and gradients, fewer saved activations.

No timing or memory-usage assertions: the saving is measured by what autograd packs for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``), which is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import scores.networks.unet as unet_module
from scores.checkpoints import load_checkpoint
from scores.config import NetworkConfig
from scores.model import ScoreModel
from scores.networks.unet import UNet

BUNDLED = Path(__file__).resolve().parents[2] / "scores" / "weights" / "source_brain.safetensors"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(dtype: torch.dtype = torch.float64, **kwargs) -> UNet:
    """A small U-Net with attention and every weight random (the zero-initialised convs included)."""
    net = UNet(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=2, attention=True, emb_channels=16, **kwargs)
    net.reset_parameters(_gen(0))
    with torch.no_grad():
        g = _gen(1)
        for p in net.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.2, generator=g)
    return net.to(dtype)


def _inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 2, 13, 10, generator=_gen(2), dtype=dtype)  # odd size: padding and cropping too
    c = torch.tensor([-0.3, 0.2], dtype=dtype)
    return x, c


def _saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the tensors autograd packs for the backward pass while ``fn()`` runs, and its result.

    Inside a non-reentrant checkpoint the checkpoint's own (inner) hooks take over, so what is
    recomputed later is not counted.
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_flag_defaults_off_and_is_not_part_of_the_state_dict() -> None:
    plain, ckpt = _net(), _net(gradient_checkpointing=True)
    assert plain.gradient_checkpointing is False and ckpt.gradient_checkpointing is True
    sa, sb = plain.state_dict(), ckpt.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert plain.set_gradient_checkpointing(True) is plain and plain.gradient_checkpointing is True
    assert plain.set_gradient_checkpointing(False) is plain and plain.gradient_checkpointing is False


@pytest.mark.parametrize("train", [False, True])
def test_outputs_are_bitwise_equal(train: bool) -> None:
    net = _net().train(train)
    x, c = _inputs()
    outs = []
    for flag in (False, True):
        net.set_gradient_checkpointing(flag)
        with torch.no_grad():
            outs.append(net(x, c))
        outs.append(net(x.clone().requires_grad_(True), c))  # the checkpointed path
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("train", [False, True])
def test_parameter_and_input_gradients_are_equal(train: bool) -> None:
    x, c = _inputs()
    weight = torch.randn(2, 2, 13, 10, generator=_gen(3), dtype=torch.float64)
    results = []
    for flag in (False, True):
        net = _net(gradient_checkpointing=flag).train(train)
        xi, ci = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        out = net(xi, ci)
        (out * weight).pow(2).sum().backward()
        results.append((out.detach(), xi.grad, ci.grad, [p.grad for p in net.parameters()]))
    (o0, gx0, gc0, gp0), (o1, gx1, gc1, gp1) = results
    assert torch.equal(o0, o1)
    assert gx0.abs().sum() > 0 and gc0.abs().sum() > 0
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gc1, gc0, rtol=1e-12, atol=1e-14)
    assert len(gp0) == len(gp1) and all(g is not None for g in gp0 + gp1)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_input_gradient_with_frozen_weights_in_eval_mode() -> None:
    """The test-time adaptation case: eval mode, weights frozen, the gradient flows to the input only."""
    x, c = _inputs()
    grads = []
    for flag in (False, True):
        net = _net(gradient_checkpointing=flag).eval().requires_grad_(False)
        xi = x.clone().requires_grad_(True)
        net(xi, c).sin().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_checkpointing_runs_only_when_autograd_records(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = unet_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    net = _net(gradient_checkpointing=True).eval()
    x, c = _inputs()
    with torch.no_grad():
        net(x, c)
    with torch.inference_mode():
        net(x, c)
    assert calls == []
    net(x, c)
    assert calls == [False] * (len(net.blocks) + 1)  # every residual block and the attention, non-reentrant
    calls.clear()
    net.set_gradient_checkpointing(False)(x, c)
    assert calls == []


def test_checkpointing_stores_fewer_activations() -> None:
    x, c = torch.randn(1, 2, 64, 64, generator=_gen(4)), torch.tensor([0.1])
    saved = {}
    for flag in (False, True):
        net = _net(torch.float32, gradient_checkpointing=flag).eval().requires_grad_(False)
        xi = x.clone().requires_grad_(True)
        saved[flag], out = _saved_bytes(lambda: net(xi, c))
        out.sum().backward()
        assert xi.grad is not None
    # the plain network stores every block's inner activations; checkpointed it stores only what
    # lies between the blocks (input/output convs, down/upsamplers)
    assert saved[True] < 0.35 * saved[False], saved


def test_score_model_switch_and_from_config() -> None:
    cfg = NetworkConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=False,
                        gradient_checkpointing=True)
    model = ScoreModel.from_config(cfg, generator=_gen(5))
    assert model.gradient_checkpointing and model.network.gradient_checkpointing
    assert model.set_gradient_checkpointing(False) is model
    assert not model.gradient_checkpointing and not model.network.gradient_checkpointing


def test_score_model_without_a_switch_is_a_clear_error() -> None:
    class Plain(nn.Module):
        def forward(self, x, c):
            return x

    model = ScoreModel(Plain())
    assert model.gradient_checkpointing is False
    with pytest.raises(TypeError, match="set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True)


def test_bundled_prior_loads_and_denoises_the_same_with_checkpointing() -> None:
    model, meta = load_checkpoint(BUNDLED)
    assert meta["config"].network.gradient_checkpointing is False and not model.gradient_checkpointing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    x = torch.randn(1, 1, 24, 20, dtype=torch.complex64, generator=_gen(6))
    with torch.no_grad():
        ref = model.denoise(x, 0.2)
    model.set_gradient_checkpointing(True)
    xi = x.clone().requires_grad_(True)
    out = model.denoise(xi, 0.2)
    assert torch.equal(out.detach(), ref)
    out.abs().pow(2).sum().backward()
    assert xi.grad is not None and torch.isfinite(torch.view_as_real(xi.grad)).all()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
