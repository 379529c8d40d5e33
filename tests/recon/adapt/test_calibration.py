"""FrequencyCalibration: exact identity at γ = 0, the band formula, gradients, detach, profiles."""

import json
import math

import numpy as np
import pytest
import torch
from fastmri.models import Unet, VarNet
from torch import nn

from recon.adapt import (
    CalibratedPrior,
    CalibrationShape,
    calibrated_prior,
    MAX_VARIABLES,
    FrequencyCalibration,
    apply_profile,
    candidate_layers,
    load_profile,
    radial_bands,
    save_profile,
)
from recon.errors import InputError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _conv_net(depth=4, channels=6, seed=0):
    """A plain conv net with random weights: conv, relu, …, output conv."""
    torch.manual_seed(seed)  # test-only: fixes nn.Conv2d's default init
    layers = [nn.Conv2d(2, channels, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(channels, 2, 1)]
    return nn.Sequential(*layers).eval()


def _bits(t):
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _tiny_varnet():
    torch.manual_seed(1)
    return VarNet(num_cascades=2, chans=4, sens_chans=2, pools=2, sens_pools=2).eval()


def _varnet_input():
    kspace = torch.randn(1, 4, 32, 24, 2, generator=_gen(2))
    mask = torch.zeros(1, 1, 1, 24, 1, dtype=torch.bool)
    mask[..., ::3, :] = True
    mask[..., 10:14, :] = True
    return kspace * mask, mask


def _score_model():
    from scores.config import NetworkConfig  # tests may join recon/ and scores/; the library never does
    from scores.model import ScoreModel

    cfg = NetworkConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=False)
    model = ScoreModel.from_config(cfg, generator=_gen(3)).eval()
    with torch.no_grad():  # the U-Net zero-inits its residual branches and output conv; give them weights
        for conv in [blk.conv2 for blk in model.blocks] + [model.network.output_conv]:
            conv.weight.normal_(0.0, 0.1, generator=_gen(4))
    return model


# name -> (module factory, run(module) -> output)
MODELS = {
    "conv_net": (_conv_net, lambda m: m(torch.randn(2, 2, 20, 17, generator=_gen(5)))),
    "fastmri_unet": (
        lambda: (torch.manual_seed(6), Unet(2, 2, chans=8, num_pool_layers=3).eval())[1],
        lambda m: m(torch.randn(1, 2, 32, 24, generator=_gen(7))),
    ),
    "fastmri_varnet": (_tiny_varnet, lambda m: m(*_varnet_input())),
    "score_model": (
        _score_model,
        lambda m: m.denoise(torch.randn(2, 1, 16, 12, dtype=torch.complex64, generator=_gen(8)), 0.5),
    ),
}


# --------------------------------------------------------------------------------------------
# bands
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (7, 12), (33, 20), (1, 16)])
@pytest.mark.parametrize("bands", [1, 2, 3, 5])
def test_bands_are_a_smooth_radial_partition_of_unity(shape, bands):
    w = radial_bands(*shape, bands=bands, dtype=torch.float64)
    assert w.shape == (bands, *shape)
    assert torch.allclose(w.sum(0), torch.ones(shape, dtype=torch.float64), atol=1e-12, rtol=0)
    w32 = radial_bands(*shape, bands=bands)
    assert (w32.sum(0) - 1).abs().max() <= 1e-6
    assert w.min() >= 0 and w.max() <= 1
    # radial: W(k) = W(-k) on the unshifted grid
    flipped = torch.roll(torch.flip(w, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    assert torch.allclose(w, flipped, atol=1e-12)
    # DC sits in the lowest band; the dominant band never decreases with the radius
    assert w[0, 0, 0] == 1
    fy, fx = torch.fft.fftfreq(shape[0], dtype=torch.float64), torch.fft.fftfreq(shape[1], dtype=torch.float64)
    r = (2 * torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)).flatten()
    dominant = w.flatten(1).argmax(0)[torch.argsort(r)]
    assert bool((dominant[1:] >= dominant[:-1]).all())


def test_two_bands_are_a_raised_cosine_step_around_the_edge():
    h, w = 16, 10
    bands = radial_bands(h, w, bands=2, dtype=torch.float64).numpy()
    fy, fx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    r = 2 * np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    # default edge √2/2; the transition spans half of each neighbouring gap: [√2/4, 3√2/4]
    t = np.clip((r - math.sqrt(2) / 4) / (math.sqrt(2) / 2), 0, 1)
    high = 0.5 - 0.5 * np.cos(np.pi * t)
    np.testing.assert_allclose(bands[1], high, atol=1e-12)
    np.testing.assert_allclose(bands[0], 1 - high, atol=1e-12)


def test_custom_band_edges_place_the_half_point_on_the_edge():
    # on a 1 x N grid r = 2|fx|; with N = 40 the radius 0.5 is sampled exactly (fx = 0.25)
    w = radial_bands(1, 40, bands=3, band_edges=[0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(w[:, 0, 10], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), atol=1e-12)
    with pytest.raises(InputError, match="band_edges"):
        radial_bands(8, 8, bands=3, band_edges=[0.9, 0.4])
    with pytest.raises(InputError, match="band_edges"):
        radial_bands(8, 8, bands=3, band_edges=[0.5])


# --------------------------------------------------------------------------------------------
# layer selection and size
# --------------------------------------------------------------------------------------------


def test_default_calibration_has_fewer_than_100_variables():
    torch.manual_seed(0)
    for module in (VarNet(), Unet(1, 1, chans=8), _conv_net(depth=40)):
        calib = FrequencyCalibration(module)
        params = list(calib.parameters())
        assert len(params) == 1 and params[0] is calib.gamma
        assert calib.num_variables == sum(p.numel() for p in params) < 100
        assert calib.gamma.shape == (min(24, len(candidate_layers(module))), 3)
        assert torch.equal(calib.gamma, torch.zeros_like(calib.gamma))
        assert set(calib.state_dict()) == {"gamma"}
    with pytest.raises(InputError, match="at most 99"):
        FrequencyCalibration(VarNet(num_cascades=2), num_layers=34, bands=3)
    assert MAX_VARIABLES == 99


def test_auto_layers_are_evenly_spaced_convs_without_the_output_conv():
    net = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(11)])
    assert candidate_layers(net) == [str(i) for i in range(10)]
    assert FrequencyCalibration(net, num_layers=4).layer_names == ("0", "3", "6", "9")
    assert FrequencyCalibration(net, num_layers=30).layer_names == tuple(str(i) for i in range(10))
    # fastMRI U-Net: the final 1x1 conv is excluded
    unet = Unet(1, 1, chans=4, num_pool_layers=2)
    assert "up_conv.1.1" not in candidate_layers(unet)
    assert candidate_layers(unet)[-1] == "up_conv.1.0.layers.4"


def test_auto_layers_follow_the_modules_blocks():
    class WithBlocks(nn.Module):
        def __init__(self, pairs):
            super().__init__()
            self.stem = nn.Conv2d(1, 2, 3)
            self.body = nn.ModuleList([nn.Conv2d(2, 2, 3) for _ in range(5)])
            self.pairs = pairs

        @property
        def blocks(self):
            return [(f"body.{i}", b) for i, b in enumerate(self.body)] if self.pairs else list(self.body)

    for pairs in (False, True):
        calib = FrequencyCalibration(WithBlocks(pairs), num_layers=3)
        assert calib.layer_names == ("body.0", "body.2", "body.4")
    model = _score_model()
    names = FrequencyCalibration(model).layer_names
    assert len(names) == len(model.blocks) == 6
    named = dict(model.named_modules())
    assert [named[n] for n in names] == model.blocks


def test_bad_layers_are_input_errors():
    net = _conv_net()
    with pytest.raises(InputError, match="'nope'"):
        FrequencyCalibration(net, layers=["nope"])
    with pytest.raises(InputError, match="more than once"):
        FrequencyCalibration(net, layers=["0", "0"])
    with pytest.raises(InputError, match="no candidate"):
        FrequencyCalibration(nn.Sequential(nn.Linear(3, 3)))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    calib = FrequencyCalibration(mlp, layers=["0"]).attach()
    with pytest.raises(InputError, match="layer '0' returned .* expected a real 4-D feature map"):
        mlp(torch.randn(2, 4))


# --------------------------------------------------------------------------------------------
# exact identity, the formula, gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_zero_gamma_is_bitwise(name):
    factory, run = MODELS[name]
    module = factory()
    reference = run(module)
    calib = FrequencyCalibration(module).attach()
    calibrated = run(module)  # autograd on: the hooks build a graph to γ
    assert calibrated.requires_grad
    assert torch.equal(_bits(calibrated), _bits(reference))
    with torch.no_grad():
        assert torch.equal(_bits(run(module)), _bits(reference))
        calib.gamma.fill_(0.3)  # the hooks really act: a non-zero γ changes the output
        assert not torch.equal(run(module), reference)
        calib.reset()
        assert torch.equal(_bits(run(module)), _bits(reference))
    calib.detach()


@pytest.mark.parametrize("size", [(16, 16), (15, 22)])
def test_correction_equals_the_band_formula(size):
    net = _conv_net(depth=4)
    x = torch.randn(2, 2, *size, generator=_gen(10))
    calib = FrequencyCalibration(net, layers=["2"], bands=4)
    gamma = torch.randn(1, 4, generator=_gen(11))
    with torch.no_grad():
        calib.gamma.copy_(gamma)
        h = net[:3](x)  # output of layer "2"
        bands = radial_bands(*size, bands=4)
        manual = h.clone()
        for b in range(4):
            manual += gamma[0, b] * torch.fft.ifft2(bands[b] * torch.fft.fft2(h)).real
        expected = net[3:](manual)
        with calib:
            got = net(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net(x), expected, atol=1e-3)  # detached again after the with-block


def test_gradients_reach_gamma_and_only_gamma_and_match_finite_differences():
    net = _conv_net(depth=5).double().requires_grad_(False)
    x = torch.randn(1, 2, 12, 14, generator=_gen(12), dtype=torch.float64)
    target = torch.randn(1, 2, 12, 14, generator=_gen(13), dtype=torch.float64)
    calib = FrequencyCalibration(net, bands=2).double().attach()

    def loss_at(gamma):
        with torch.no_grad():
            calib.gamma.copy_(gamma)
        return (net(x) - target).square().sum()

    gamma0 = 0.2 * torch.randn(calib.gamma.shape, generator=_gen(14), dtype=torch.float64)
    loss_at(gamma0).backward()
    grad = calib.gamma.grad.clone()
    assert all(p.grad is None for p in net.parameters())
    assert bool((grad != 0).all())
    eps = 1e-6
    for idx in [(0, 0), (1, 1), (3, 0)]:
        step = torch.zeros_like(gamma0)
        step[idx] = eps
        with torch.no_grad():
            fd = (loss_at(gamma0 + step) - loss_at(gamma0 - step)) / (2 * eps)
        assert math.isclose(fd.item(), grad[idx].item(), rel_tol=1e-6, abs_tol=1e-9)
    # a frozen fastMRI U-Net in eval mode: gradients still flow to γ at γ = 0, and only there
    unet = Unet(2, 2, chans=8, num_pool_layers=2).eval().requires_grad_(False)
    calib = FrequencyCalibration(unet).attach()
    unet(torch.randn(1, 2, 16, 16, generator=_gen(15))).square().mean().backward()
    assert calib.gamma.grad is not None and bool(torch.isfinite(calib.gamma.grad).all())
    assert calib.gamma.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


# --------------------------------------------------------------------------------------------
# detach
# --------------------------------------------------------------------------------------------


def _hook_counts(module):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in module.named_modules()}


def test_detach_restores_the_module():
    torch.manual_seed(16)
    unet = Unet(2, 2, chans=8, num_pool_layers=2)
    seen = []
    unet.down_sample_layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # a user's own hook
    x = torch.randn(1, 2, 16, 16, generator=_gen(17))
    before_out = unet(x).detach()
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    before_hooks = _hook_counts(unet)
    before_flags = [(p.requires_grad, id(p)) for p in unet.parameters()]
    before_mode = [m.training for m in unet.modules()]

    calib = FrequencyCalibration(unet).attach().attach()  # attaching twice registers once
    added = sum(a for a, _ in _hook_counts(unet).values()) - sum(a for a, _ in before_hooks.values())
    assert added == len(calib.layer_names)
    with torch.no_grad():
        calib.gamma.normal_(0.0, 0.5, generator=_gen(18))
    unet(x).square().sum().backward()  # changes grads, not weights
    assert not torch.equal(unet(x), before_out)
    calib.detach().detach()

    assert _hook_counts(unet) == before_hooks
    assert list(unet.state_dict()) == list(before_state)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before_state.items())
    assert [(p.requires_grad, id(p)) for p in unet.parameters()] == before_flags
    assert [m.training for m in unet.modules()] == before_mode
    assert torch.equal(_bits(unet(x).detach()), _bits(before_out))
    assert len(seen) == 4  # the user's hook survived and ran on every forward

    with calib:
        assert calib.attached
        assert not torch.equal(unet(x), before_out)
    assert not calib.attached and _hook_counts(unet) == before_hooks


# --------------------------------------------------------------------------------------------
# state and site profiles
# --------------------------------------------------------------------------------------------


def test_state_round_trip_and_mismatch():
    net = _conv_net(depth=6)
    calib = FrequencyCalibration(net)
    with torch.no_grad():
        calib.gamma.normal_(generator=_gen(19))
    other = FrequencyCalibration(_conv_net(depth=6))
    other.load_state(calib.state())
    assert torch.equal(other.gamma, calib.gamma)
    with pytest.raises(InputError, match="'layers'"):
        FrequencyCalibration(net, num_layers=2).load_state(calib.state())
    with pytest.raises(InputError, match="'band_edges'"):
        FrequencyCalibration(net, band_edges=[0.3, 0.6]).load_state(calib.state())


def test_site_profile_round_trip_is_small_and_exact(tmp_path):
    module = VarNet(num_cascades=3, chans=4, sens_chans=2, pools=2, sens_pools=2).eval()
    calib = FrequencyCalibration(module)
    assert calib.num_variables == 72
    with torch.no_grad():
        calib.gamma.normal_(0.0, 0.1, generator=_gen(20))
    path = tmp_path / "unseen_center.json"
    prior = "a" * 64  # a checkpoint sha256
    save_profile(path, calib, site="unseen_center", prior=prior, extra={"heldout_loss": 0.125})
    assert path.stat().st_size < 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unseen_center.json"]  # no temp file left
    record = json.loads(path.read_text())
    assert record["site"] == "unseen_center" and record["prior"] == prior

    profile = load_profile(path)
    assert (profile.site, profile.prior, profile.extra) == ("unseen_center", prior, {"heldout_loss": 0.125})
    fresh = FrequencyCalibration(module)
    apply_profile(path, fresh, prior=prior)
    assert torch.equal(fresh.gamma, calib.gamma)

    with pytest.raises(InputError, match=f"{path}.*'prior'"):
        apply_profile(profile, fresh, prior="another")
    with pytest.raises(InputError, match=f"{path}.*'layers'"):
        apply_profile(profile, FrequencyCalibration(module, num_layers=10))
    with pytest.raises(InputError, match=f"{path}.*'band_edges'"):
        apply_profile(profile, FrequencyCalibration(module, band_edges=[0.2, 0.9]))
    with pytest.raises(InputError, match="exists"):
        save_profile(path, calib, site="s", prior="p", overwrite=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**record, "gamma": {"shape": [24, 3], "float32_base64": "AAAA"}}))
    with pytest.raises(InputError, match=f"{bad}.*'gamma'"):
        load_profile(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match=str(bad)):
        load_profile(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(InputError, match="'site'"):
        save_profile(tmp_path / "x.json", calib, site="", prior="p")


class _DenoisingNet(nn.Module):
    """A tiny network with ``denoise(x, sigma)`` on complex images (two real channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _conv_net(depth=3, channels=2, seed=4)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        h = self.net(torch.cat([x.real, x.imag], dim=1))
        return torch.complex(h[:, :1], h[:, 1:])


def test_calibrated_prior_is_a_value_the_profiles_validated_load_returns(tmp_path):
    """A saved γ comes back as a CalibratedPrior: its denoiser is the calibrated network's, nothing is
    left attached to the prior between calls, and a profile of another prior or shape is refused."""
    prior = _DenoisingNet().requires_grad_(False)
    calib = FrequencyCalibration(prior, num_layers=3, bands=2)
    with torch.no_grad():
        calib.gamma.normal_(0.0, 0.3, generator=_gen(5))
    x = torch.randn(2, 1, 12, 10, dtype=torch.complex64, generator=_gen(6))
    with calib:
        expected = prior.denoise(x, 0.1)
    path = save_profile(tmp_path / "site.json", calib, site="s", prior="p" * 64)
    value, profile = calibrated_prior(path, prior, "p" * 64, CalibrationShape(layers=3, bands=2))
    assert isinstance(value, CalibratedPrior) and profile.site == "s"
    assert torch.equal(value.gamma, calib.gamma.detach())
    assert torch.equal(value.denoise(x, 0.1), expected)  # the calibrated network, bit for bit
    assert not value.calibration.attached and not torch.equal(prior.denoise(x, 0.1), expected)  # prior untouched
    with torch.no_grad():
        calib.gamma.zero_()
    assert torch.equal(value.denoise(x, 0.1), expected)  # a copy of γ: later changes do not leak in
    with pytest.raises(InputError, match="'prior'"):
        calibrated_prior(path, prior, "q" * 64, CalibrationShape(layers=3, bands=2))
    with pytest.raises(InputError, match="'band_edges'"):
        calibrated_prior(path, prior, "p" * 64, CalibrationShape(layers=3, bands=3))
    with pytest.raises(InputError, match="'family'"):
        calibrated_prior(path, prior, "p" * 64, CalibrationShape("conv_gain"))


@pytest.mark.parametrize("family", ["norm_affine", "conv_gain", "sigma_in"])
def test_a_profile_of_every_family_round_trips_and_is_checked(tmp_path, family):
    """Any family's γ is saved and comes back exactly as a CalibratedPrior whose denoiser is the calibrated one; a
    profile of another family, of another layer list, or (per-level families) of another σ range is refused."""
    model = _score_model()
    shape = CalibrationShape(family, sigma_range=(0.5, 0.01))
    calib = shape.build(model).attach()
    with torch.no_grad():
        calib.gamma.normal_(0.0, 0.2, generator=_gen(8))
    x = torch.randn(1, 1, 12, 10, dtype=torch.complex64, generator=_gen(9))
    with torch.no_grad():
        expected = calib.denoise(x, 0.1)
    calib.detach()
    path = save_profile(tmp_path / "site.json", calib, site="s", prior="p" * 64)
    assert len(path.read_bytes()) < 2000
    value, profile = calibrated_prior(path, model, "p" * 64, shape)
    assert profile.family == family and torch.equal(value.gamma, calib.gamma.detach())
    with torch.no_grad():
        assert torch.equal(value.denoise(x, 0.1), expected)
        assert not torch.equal(model.denoise(x, 0.1), expected)  # nothing left attached
    with pytest.raises(InputError, match="'family'"):
        calibrated_prior(path, model, "p" * 64, CalibrationShape("freeu"))
    if family == "sigma_in":
        with pytest.raises(InputError, match="'sigma_range'"):
            calibrated_prior(path, model, "p" * 64, CalibrationShape(family, sigma_range=(1.0, 0.01)))
    else:
        other = _score_model().network  # other layer names: the network without the ScoreModel wrapper
        other.denoise = model.denoise
        with pytest.raises(InputError, match="'layers'"):
            calibrated_prior(path, other, "p" * 64, shape)
