"""FrequencyCalibration on a ScoreModel with gradient checkpointing: same γ-gradients, clean detach.

With checkpointing the hooked blocks are recomputed in the backward pass, hooks included; the
gradient that reaches γ (closed over by the hooks, not a block input) must be the one without.
"""

from __future__ import annotations

import pytest
import torch

from recon.adapt import FrequencyCalibration


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _score_model(checkpointing: bool):
    from scores.config import NetworkConfig  # tests may join recon/ and scores/; the library never does
    from scores.model import ScoreModel

    cfg = NetworkConfig(base_channels=8, channel_mults=[1, 2, 2], num_res_blocks=2, attention=True,
                        emb_channels=16)
    model = ScoreModel.from_config(cfg, generator=_gen(3)).eval()
    with torch.no_grad():  # the U-Net zero-inits its residual branches, attention and output conv; give them weights
        g = _gen(4)
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.1, generator=g)
    model.requires_grad_(False)  # as in BiasRecon: only γ is fitted
    return model.set_gradient_checkpointing(checkpointing)


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 20, 14, dtype=torch.complex64, generator=_gen(8))


def _gamma_gradient(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Denoiser output and γ's gradient of a fixed loss at a random γ."""
    model = _score_model(checkpointing)
    calib = FrequencyCalibration(model, layers="auto", num_layers=24, bands=3).attach()
    with torch.no_grad():
        calib.gamma.copy_(0.3 * torch.randn(calib.gamma.shape, generator=_gen(9)))
    target = torch.randn(2, 1, 20, 14, dtype=torch.complex64, generator=_gen(10))
    out = model.denoise(_x(), 0.4)
    loss = (out - target).abs().pow(2).sum()
    loss.backward()
    calib.detach()
    return out.detach(), calib.gamma.grad.clone(), calib.gamma.detach().clone()


def test_gamma_gradients_are_equal_with_and_without_checkpointing() -> None:
    out0, grad0, gamma0 = _gamma_gradient(False)
    out1, grad1, gamma1 = _gamma_gradient(True)
    assert torch.equal(gamma0, gamma1)
    assert grad0.shape == (len(_score_model(False).blocks), 3)  # every residual block calibrated
    assert bool((grad0 != 0).all()), "every γ should receive a gradient"
    assert torch.equal(out0, out1)
    torch.testing.assert_close(grad1, grad0, rtol=1e-5, atol=1e-7)


def test_calibrated_model_is_recomputed_in_the_backward_pass() -> None:
    """The hooked block runs again during backward (it is inside the checkpointed region).

    Counted with a forward *pre*-hook: the non-reentrant checkpoint stops recomputing as soon as
    every tensor it needs is back, so hooks registered after the calibration's may not rerun.
    """
    counts = {"forward": 0}
    model = _score_model(True)
    calib = FrequencyCalibration(model, layers="auto", num_layers=2, bands=2).attach()
    layer = dict(model.named_modules())[calib.layer_names[0]]
    handle = layer.register_forward_pre_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    try:
        out = model.denoise(_x(), 0.4)
        assert counts["forward"] == 1
        out.abs().sum().backward()
        assert counts["forward"] == 2
        assert calib.gamma.grad is not None
    finally:
        handle.remove()
        calib.detach()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_detach_restores_the_module(checkpointing: bool) -> None:
    model = _score_model(checkpointing)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x()
    with torch.no_grad():
        ref = model.denoise(x, 0.4)
    calib = FrequencyCalibration(model, layers="auto", num_layers=24, bands=3).attach()
    with torch.no_grad():
        calib.gamma.fill_(0.5)
    out = model.denoise(x, 0.4)
    out.abs().sum().backward()
    assert not torch.equal(out.detach(), ref)
    calib.detach()
    assert not calib.attached
    assert all(not m._forward_hooks for m in model.modules())
    assert model.gradient_checkpointing is checkpointing
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model.denoise(x, 0.4), ref)
    assert torch.equal(model.denoise(x, 0.4).detach(), ref)  # grad-enabled (checkpointed) path too
