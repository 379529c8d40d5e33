"""Calibration families: exact identity at γ = 0, detach, gradients, each family's formula, level blocks, limits."""

import math

import pytest
import torch
from fastmri.models import Unet
from torch import nn

from recon.adapt import MAX_VARIABLES, FrequencyCalibration, radial_bands
from recon.adapt.families import (
    FAMILIES,
    ConvGain,
    FreeU,
    NormAffine,
    ResidualBands,
    SigmaIn,
    SigmaResidual,
    decoder_stages,
    level_block,
    make_calibration,
)
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.errors import InputError
from recon.operators import Sense
from scores.samplers import TweedieSampler  # tests may join recon/ and scores/; the library never does

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny convolutions: one thread (tests/conftest.py)

SIGMA_RANGE = (0.5, 0.01)
LAYER_FAMILIES = ("bands", "conv_gain", "norm_affine", "freeu")  # hooks inside the network
LEVEL_FAMILIES = ("residual_bands", "sigma_in", "sigma_residual")  # act on denoise(x, sigma)
# in range (each of several blocks) and outside it on both sides (clamped to the end blocks)
SIGMAS = (0.5, 0.2, 0.05, 0.011, 0.9, 0.003)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bits(t):
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _hook_counts(module):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in module.named_modules()}


def _score_model(channel_mults=(1, 2), num_res_blocks=1, base_channels=8):
    from scores.config import NetworkConfig
    from scores.model import ScoreModel

    cfg = NetworkConfig(base_channels=base_channels, channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                        attention=False)
    model = ScoreModel.from_config(cfg, generator=_gen(3)).eval()
    with torch.no_grad():  # the U-Net zero-inits its residual branches and output conv; give them weights
        for conv in [blk.conv2 for blk in model.blocks] + [model.network.output_conv]:
            conv.weight.normal_(0.0, 0.1, generator=_gen(4))
    return model


def _unet(num_pool_layers=2, chans=4):
    torch.manual_seed(6)  # test-only: fixes the default init
    return Unet(2, 2, chans=chans, num_pool_layers=num_pool_layers).eval()


def _image(seed=8, shape=(2, 1, 16, 12)):
    return torch.randn(*shape, dtype=torch.complex64, generator=_gen(seed))


def _unet_input(seed=7):
    return torch.randn(1, 2, 24, 20, generator=_gen(seed))


def _block_middle(k, blocks, sigma_range=SIGMA_RANGE):
    """The noise level in the middle (in log σ) of level block ``k`` of ``blocks``."""
    start, end = sigma_range
    return start * (end / start) ** ((k + 0.5) / blocks)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 2, 1)).eval()


# --------------------------------------------------------------------------------------------
# shape of each family
# --------------------------------------------------------------------------------------------


def test_each_family_holds_only_a_zero_gamma_of_its_documented_shape():
    model = _score_model()
    named = list(model.named_modules())
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    norms = [n for n, m in named if isinstance(m, nn.GroupNorm)]
    expected = {
        "bands": (len(model.blocks), 3),
        "conv_gain": (len(convs) - 1,),
        "norm_affine": (len(norms), 2),
        "freeu": (2, 2),  # two decoder stages
        "residual_bands": (10, 8),
        "sigma_in": (20,),
        "sigma_residual": (10 + 10 * 8,),
    }
    assert set(expected) == set(FAMILIES)
    for family in FAMILIES:
        calib = make_calibration(family, model, sigma_range=SIGMA_RANGE)
        assert calib.gamma.shape == expected[family], family
        params = list(calib.parameters())
        assert len(params) == 1 and params[0] is calib.gamma and isinstance(calib.gamma, nn.Parameter)
        assert set(calib.state_dict()) == {"gamma"}  # the module is held by reference, not registered
        assert calib.gamma.dtype == torch.float32 and not calib.gamma.any()
        assert calib.num_variables == calib.gamma.numel() <= MAX_VARIABLES
        assert not calib.attached
    assert isinstance(make_calibration("bands", model), FrequencyCalibration)
    assert make_calibration("bands", model, layers=2, bands=4).gamma.shape == (2, 4)
    # the hooked layers: every conv but the output one; every norm; the first block of each decoder stage
    assert ConvGain(model).layer_names == tuple(convs[:-1]) and convs[-1] == "network.output_conv"
    assert NormAffine(model).layer_names == tuple(norms)
    assert FreeU(model).layer_names == ("network.decoder.0.0", "network.decoder.1.0")
    unet = _unet()
    assert "up_conv.1.1" not in ConvGain(unet).layer_names  # fastMRI's final 1x1 conv
    assert len(ConvGain(unet).layer_names) == sum(isinstance(m, nn.Conv2d) for m in unet.modules()) - 1
    assert NormAffine(unet).gamma.shape == (sum(isinstance(m, nn.InstanceNorm2d) for m in unet.modules()), 2)


# --------------------------------------------------------------------------------------------
# exact identity at γ = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_zero_gamma_is_bitwise_on_the_score_model(family):
    model = _score_model().requires_grad_(False)
    x = _image()
    batch_sigma = torch.tensor([0.05, 0.3])
    with torch.no_grad():
        reference = {s: model.denoise(x, s) for s in SIGMAS}
        reference_batch = model.denoise(x, batch_sigma)
    calib = make_calibration(family, model, sigma_range=SIGMA_RANGE).attach()
    for s in SIGMAS:
        out = calib.denoise(x, s)  # autograd on: the only leaf needing grad is γ
        assert out.requires_grad
        assert torch.equal(_bits(out), _bits(reference[s])), s
    assert torch.equal(_bits(calib.denoise(x, batch_sigma)), _bits(reference_batch))
    with torch.no_grad():
        for s in SIGMAS:
            assert torch.equal(_bits(calib.denoise(x, s)), _bits(reference[s])), s
        calib.gamma.fill_(0.3)  # the family really acts: a non-zero γ changes every level's output
        for s in SIGMAS:
            assert not torch.allclose(calib.denoise(x, s), reference[s], atol=1e-4), s
        calib.reset()
        for s in SIGMAS:
            assert torch.equal(_bits(calib.denoise(x, s)), _bits(reference[s])), s
    calib.detach()


@pytest.mark.parametrize("family", LAYER_FAMILIES)
def test_identity_at_zero_gamma_is_bitwise_on_a_fastmri_unet(family):
    unet = _unet().requires_grad_(False)
    x = _unet_input()
    with torch.no_grad():
        reference = unet(x)
    calib = make_calibration(family, unet).attach()
    out = unet(x)
    assert out.requires_grad  # the hooks build a graph to γ
    assert torch.equal(_bits(out), _bits(reference))
    with torch.no_grad():
        calib.gamma.fill_(0.3)
        assert not torch.equal(unet(x), reference)
        calib.reset()
        assert torch.equal(_bits(unet(x)), _bits(reference))
    calib.detach()


@pytest.mark.parametrize("family", LEVEL_FAMILIES)
def test_level_families_need_a_denoiser(family):
    with pytest.raises(InputError, match="denoise"):
        make_calibration(family, _unet())
    assert callable(getattr(make_calibration(family, _score_model()), "denoise"))


# --------------------------------------------------------------------------------------------
# detach
# --------------------------------------------------------------------------------------------


def _cases():
    return [("score_model", f) for f in FAMILIES] + [("fastmri_unet", f) for f in LAYER_FAMILIES]


@pytest.mark.parametrize("kind, family", _cases())
def test_detach_restores_the_module_exactly(kind, family):
    if kind == "score_model":
        module, x = _score_model(), _image()
        run_module = lambda: module.denoise(x, 0.05)  # noqa: E731
    else:
        module, x = _unet(), _unet_input()
        run_module = lambda: module(x)  # noqa: E731
    seen = []
    first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    first.register_forward_hook(lambda m, i, o: seen.append(1))  # a user's own hook
    with torch.no_grad():
        before_out = run_module()
    before_state = {k: v.clone() for k, v in module.state_dict().items()}
    before_hooks = _hook_counts(module)
    before_flags = [p.requires_grad for p in module.parameters()]

    calib = make_calibration(family, module, sigma_range=SIGMA_RANGE).attach().attach()  # once only
    assert calib.attached
    after = _hook_counts(module)
    added = {n: (after[n][0] - before_hooks[n][0], after[n][1] - before_hooks[n][1]) for n in after}
    hooked = {n for n, c in added.items() if c != (0, 0)}
    if family in LEVEL_FAMILIES:
        assert hooked == set()  # they change denoise, never the network
    elif family == "freeu":
        assert hooked == set(calib.layer_names) and all(added[n] == (0, 1) for n in hooked)
    else:
        assert hooked == set(calib.layer_names) and all(added[n] == (1, 0) for n in hooked)

    with torch.no_grad():
        calib.gamma.normal_(0.0, 0.3, generator=_gen(18))
    calibrated = calib.denoise(x, 0.05) if kind == "score_model" else module(x)
    assert not torch.allclose(calibrated, before_out, atol=1e-5)
    calibrated.abs().square().sum().backward()  # changes grads, never weights
    calib.detach().detach()

    assert not calib.attached
    assert _hook_counts(module) == before_hooks
    assert list(module.state_dict()) == list(before_state)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before_state.items())
    assert [p.requires_grad for p in module.parameters()] == before_flags
    with torch.no_grad():
        assert torch.equal(_bits(run_module()), _bits(before_out))  # γ is still non-zero
    assert len(seen) == 3  # the user's hook survived and ran on every forward
    calib.attach()  # attach again after detach: the same hooks once more
    assert _hook_counts(module) == after
    calib.detach()
    assert _hook_counts(module) == before_hooks


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


def _used_entries(family, calib, sigma):
    """The mask of the γ entries that ``denoise(·, sigma)`` uses (all of them for the layer families)."""
    mask = torch.zeros(calib.gamma.shape, dtype=torch.bool)
    if family == "residual_bands":
        mask[level_block(sigma, SIGMA_RANGE, 10)] = True
    elif family == "sigma_in":
        mask[level_block(sigma, SIGMA_RANGE, 20)] = True
    elif family == "sigma_residual":
        mask[level_block(sigma, SIGMA_RANGE, 10)] = True
        mask[10:].view(10, 8)[level_block(sigma, SIGMA_RANGE, 10)] = True
    else:
        mask[...] = True
    return mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sigma", [0.3, 0.02])
def test_gradients_reach_the_used_gammas_and_never_the_weights(family, sigma):
    model = _score_model().requires_grad_(False)
    x, target = _image(8), _image(9)
    calib = make_calibration(family, model, sigma_range=SIGMA_RANGE).attach()
    with torch.no_grad():  # a non-zero γ, so that the rows the level does not use would show a leak
        calib.gamma.normal_(0.0, 0.1, generator=_gen(10))
    (calib.denoise(x, sigma) - target).abs().square().sum().backward()
    grad = calib.gamma.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    used = _used_entries(family, calib, sigma)
    assert bool((grad[used] != 0).all())
    assert bool((grad[~used] == 0).all())
    assert all(p.grad is None for p in model.parameters())
    calib.detach()


@pytest.mark.parametrize("family", LAYER_FAMILIES)
def test_gradients_reach_gamma_through_a_frozen_fastmri_unet(family):
    unet = _unet().requires_grad_(False)
    calib = make_calibration(family, unet).attach()
    unet(_unet_input()).square().mean().backward()
    grad = calib.gamma.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    calib.detach()


# --------------------------------------------------------------------------------------------
# each family's formula against an independent computation
# --------------------------------------------------------------------------------------------


def _capture(store, key):
    def hook(_module, _inputs, output):
        store[key] = output.detach().clone()

    return hook


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_conv_gain_scales_exactly_that_convolution_by_one_plus_gamma(which):
    model = _score_model().requires_grad_(False)
    x = _image()
    calib = ConvGain(model)
    index = {"first": 0, "middle": len(calib.layer_names) // 2, "last": len(calib.layer_names) - 1}[which]
    named = dict(model.named_modules())
    conv = named[calib.layer_names[index]]
    other = named[calib.layer_names[(index + 1) % len(calib.layer_names)]]
    g = 0.375
    store = {}
    handles = [conv.register_forward_hook(_capture(store, "raw")),  # before the calibration's hook: raw output
               other.register_forward_hook(_capture(store, "other_raw"))]
    calib.attach()
    handles += [conv.register_forward_hook(_capture(store, "out")),  # after it: the calibrated output
                other.register_forward_hook(_capture(store, "other_out"))]
    with torch.no_grad():
        calib.gamma[index] = g
        got = calib.denoise(x, 0.1)
    assert torch.equal(store["out"], store["raw"] * (1.0 + g))
    assert torch.equal(store["other_out"], store["other_raw"])  # every other gain is 0: untouched
    calib.detach()
    for h in handles:
        h.remove()
    # the whole denoiser: the same as a hand-made hook on that one convolution
    manual = conv.register_forward_hook(lambda m, i, o: o * (1.0 + g))
    with torch.no_grad():
        expected = model.denoise(x, 0.1)
    manual.remove()
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model.denoise(x, 0.1), got, atol=1e-5)  # the gain did change the output


@pytest.mark.parametrize("a, b", [(0.0, 0.25), (-0.5, 0.0), (0.3, -0.2)])
def test_norm_affine_is_a_scale_and_a_shift_of_that_norms_output(a, b):
    model = _score_model().requires_grad_(False)
    x = _image()
    calib = NormAffine(model)
    index = len(calib.layer_names) // 2
    named = dict(model.named_modules())
    norm = named[calib.layer_names[index]]
    store = {}
    handles = [norm.register_forward_hook(_capture(store, "raw"))]
    calib.attach()
    handles.append(norm.register_forward_hook(_capture(store, "out")))
    with torch.no_grad():
        calib.gamma[index] = torch.tensor([a, b])
        got = calib.denoise(x, 0.1)
    if a == 0.0:
        assert torch.equal(store["out"], store["raw"] + b)  # a = 0, b = c: adds c
    assert torch.allclose(store["out"], (1.0 + a) * store["raw"] + b, atol=1e-6, rtol=1e-6)
    calib.detach()
    for h in handles:
        h.remove()
    manual = norm.register_forward_hook(lambda m, i, o: (1.0 + a) * o + b)
    with torch.no_grad():
        expected = model.denoise(x, 0.1)
    manual.remove()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def _capture_input(store, key):
    def pre_hook(_module, args):
        store[key] = args[0].detach().clone()

    return pre_hook


@pytest.mark.parametrize("kind", ["score_model", "fastmri_unet"])
def test_freeu_gains_the_backbone_and_the_low_frequencies_of_the_skip(kind):
    if kind == "score_model":
        module, x = _score_model().requires_grad_(False), _image()
        run = lambda: calib.denoise(x, 0.1)  # noqa: E731
    else:
        module, x = _unet().requires_grad_(False), _unet_input()
        run = lambda: module(x)  # noqa: E731
    calib = FreeU(module)
    stages = decoder_stages(module)
    for index, (_name, first, backbone) in enumerate(stages):
        store = {}
        handles = [first.register_forward_pre_hook(_capture_input(store, "raw"))]  # runs before the calibration
        calib.attach()
        handles.append(first.register_forward_pre_hook(_capture_input(store, "in")))  # runs after it
        with torch.no_grad():
            calib.reset()
            calib.gamma[index, 0] = 1.0  # b = 1: the backbone doubles, the skip is untouched
            run()
            raw, seen = store["raw"], store["in"]
            assert seen.shape == raw.shape
            assert torch.equal(seen[:, :backbone], 2.0 * raw[:, :backbone])
            assert torch.equal(seen[:, backbone:], raw[:, backbone:])
            calib.gamma[index] = torch.tensor([0.0, 0.5])  # c = 0.5: the skip's low frequencies
            run()
            raw, seen = store["raw"], store["in"]
            skip = raw[:, backbone:]
            low = radial_bands(*skip.shape[-2:], bands=2)[0]
            expected = skip + 0.5 * torch.fft.ifft2(low * torch.fft.fft2(skip)).real
            assert torch.equal(seen[:, :backbone], raw[:, :backbone])
            assert torch.allclose(seen[:, backbone:], expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(seen[:, backbone:], skip, atol=1e-3)
            # every other stage: γ = 0 there, its input is exactly what the calibrated upstream gives it
        calib.detach()
        for h in handles:
            h.remove()
    calib.reset()


@pytest.mark.parametrize("k", [0, 7, 19])
def test_sigma_in_tells_the_network_a_scaled_noise_level_in_its_block_only(k):
    model = _score_model().requires_grad_(False)
    x = _image()
    calib = SigmaIn(model, SIGMA_RANGE).attach()
    with torch.no_grad():
        calib.gamma[k] = math.log(2.0)
        sigma = _block_middle(k, 20)
        assert torch.allclose(calib.denoise(x, sigma), model.denoise(x, 2.0 * sigma), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(calib.denoise(x, sigma), model.denoise(x, sigma), atol=1e-3)
        other = _block_middle((k + 5) % 20, 20)
        assert torch.equal(_bits(calib.denoise(x, other)), _bits(model.denoise(x, other)))
        if k == 0:  # above sigma_start: clamped into the first block
            assert torch.allclose(calib.denoise(x, 0.9), model.denoise(x, 1.8), atol=1e-5, rtol=1e-5)
        if k == 19:  # below sigma_end: clamped into the last block
            assert torch.allclose(calib.denoise(x, 0.004), model.denoise(x, 0.008), atol=1e-5, rtol=1e-5)
    calib.detach()


def _band_filter(residual, gain):
    """``IFFT2(G ⊙ FFT2(r))`` for a real ``(H, W)`` gain on complex images."""
    return torch.fft.ifft2(torch.fft.fft2(residual) * gain)


@pytest.mark.parametrize("k", [0, 4, 9])
def test_residual_bands_gain_the_residual_per_band_in_the_levels_block(k):
    model = _score_model().requires_grad_(False)
    x = _image()
    calib = ResidualBands(model, SIGMA_RANGE).attach()
    sigma = _block_middle(k, 10)
    with torch.no_grad():
        d = model.denoise(x, sigma)
        g = 0.4
        calib.gamma[k] = g  # every band the same gain: the bands sum to 1, so d + g (d - x)
        assert torch.allclose(calib.denoise(x, sigma), d + g * (d - x), atol=1e-5, rtol=1e-5)
        # one band: d + IFFT2(g W_b FFT2(d - x)), W_b the b-th of 8 radial bands on the image grid
        bands = radial_bands(*x.shape[-2:], bands=8)
        for b in (0, 3, 7):
            calib.gamma[k] = 0.0
            calib.gamma[k, b] = g
            expected = d + _band_filter(d - x, g * bands[b])
            assert torch.allclose(calib.denoise(x, sigma), expected, atol=1e-5, rtol=1e-5)
        # another block's level: untouched
        other = _block_middle((k + 3) % 10, 10)
        assert torch.equal(_bits(calib.denoise(x, other)), _bits(model.denoise(x, other)))
    calib.detach()


def test_sigma_residual_is_the_level_factor_then_the_residual_gains():
    model = _score_model().requires_grad_(False)
    x = _image()
    calib = SigmaResidual(model, SIGMA_RANGE).attach()
    assert calib.gamma.shape == (10 + 10 * 8,)
    sigma = _block_middle(3, 10)
    with torch.no_grad():
        calib.gamma[3] = math.log(2.0)  # the K1 level factors come first
        calib.gamma[10:].view(10, 8)[3] = 0.25  # then the K2 x B residual gains, row by row
        d = model.denoise(x, 2.0 * sigma)
        assert torch.allclose(calib.denoise(x, sigma), d + 0.25 * (d - x), atol=1e-5, rtol=1e-5)
        # the residual gains alone
        calib.gamma[3] = 0.0
        d = model.denoise(x, sigma)
        assert torch.allclose(calib.denoise(x, sigma), d + 0.25 * (d - x), atol=1e-5, rtol=1e-5)
        other = _block_middle(7, 10)
        assert torch.equal(_bits(calib.denoise(x, other)), _bits(model.denoise(x, other)))
    calib.detach()


def test_bands_family_adds_band_filtered_block_outputs():
    model = _score_model().requires_grad_(False)
    x = _image()
    calib = make_calibration("bands", model)
    named = dict(model.named_modules())
    assert [named[n] for n in calib.layer_names] == model.blocks
    index = 2
    gamma = torch.tensor([0.3, -0.2, 0.5])
    calib.attach()
    with torch.no_grad():
        calib.gamma[index] = gamma
        got = calib.denoise(x, 0.1)
    calib.detach()

    def manual(_m, _i, h):
        bands = radial_bands(*h.shape[-2:], bands=3)
        return h + sum(gamma[b] * torch.fft.ifft2(bands[b] * torch.fft.fft2(h)).real for b in range(3))

    handle = model.blocks[index].register_forward_hook(manual)
    with torch.no_grad():
        expected = model.denoise(x, 0.1)
    handle.remove()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model.denoise(x, 0.1), expected, atol=1e-3)


# --------------------------------------------------------------------------------------------
# level blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 3, 10, 20])
def test_level_blocks_split_the_schedule_evenly_in_log_sigma(blocks):
    start, end = SIGMA_RANGE
    assert level_block(start, SIGMA_RANGE, blocks) == 0
    assert level_block(end, SIGMA_RANGE, blocks) == blocks - 1
    for outside, block in [(10.0, 0), (start * 1.0001, 0), (end * 0.9999, blocks - 1), (1e-6, blocks - 1),
                           (0.0, blocks - 1)]:
        assert level_block(outside, SIGMA_RANGE, blocks) == block, outside
    for k in range(blocks):
        assert level_block(_block_middle(k, blocks), SIGMA_RANGE, blocks) == k
    # monotone: a lower noise level never falls in an earlier block; every block is reached
    sigmas = torch.logspace(math.log10(2.0), math.log10(0.002), 500, dtype=torch.float64)
    found = [level_block(float(s), SIGMA_RANGE, blocks) for s in sigmas]
    assert all(b >= a for a, b in zip(found, found[1:]))
    assert set(found) == set(range(blocks))
    # the blocks are equally long in log σ: as many of the log-spaced in-range levels in each
    inside = [b for s, b in zip(sigmas.tolist(), found) if end < s < start]
    counts = [inside.count(k) for k in range(blocks)]
    assert max(counts) - min(counts) <= 1
    # a tensor level: its first value decides
    assert level_block(torch.tensor(_block_middle(blocks - 1, blocks)), SIGMA_RANGE, blocks) == blocks - 1
    assert level_block(torch.tensor([0.5, 0.01]), SIGMA_RANGE, blocks) == 0
    assert level_block(torch.tensor([0.01, 0.5]), SIGMA_RANGE, blocks) == blocks - 1


# --------------------------------------------------------------------------------------------
# limits and errors
# --------------------------------------------------------------------------------------------


def test_more_than_99_variables_is_an_input_error():
    big = _score_model(channel_mults=(1, 2, 2, 4), num_res_blocks=2, base_channels=4)  # 18 blocks
    assert len(big.blocks) == 18
    assert make_calibration("bands", big, layers=24, bands=5).num_variables == 90
    with pytest.raises(InputError, match="108"):
        make_calibration("bands", big, layers=24, bands=6)  # 18 x 6 = 108
    model = _score_model()
    with pytest.raises(InputError, match="at most 99"):
        make_calibration("bands", model, layers=24, bands=17)  # 6 x 17 = 102
    # one gain per conv but the output one: 100 convs hold 99 variables, 101 hold 100
    assert ConvGain(nn.Sequential(*[nn.Conv2d(1, 1, 1) for _ in range(100)])).num_variables == 99
    with pytest.raises(InputError, match="at most 99"):
        ConvGain(nn.Sequential(*[nn.Conv2d(1, 1, 1) for _ in range(101)]))
    assert NormAffine(nn.Sequential(*[nn.GroupNorm(1, 1) for _ in range(49)])).num_variables == 98
    with pytest.raises(InputError, match="at most 99"):
        NormAffine(nn.Sequential(*[nn.GroupNorm(1, 1) for _ in range(50)]))
    assert SigmaIn(model, SIGMA_RANGE, blocks=99).num_variables == 99
    with pytest.raises(InputError, match="at most 99"):
        SigmaIn(model, SIGMA_RANGE, blocks=100)
    with pytest.raises(InputError, match="at most 99"):
        ResidualBands(model, SIGMA_RANGE, blocks=13, bands=8)
    with pytest.raises(InputError, match="at most 99"):
        SigmaResidual(model, SIGMA_RANGE, sigma_blocks=20, blocks=10, bands=8)


def test_bad_families_modules_and_ranges_are_input_errors():
    model = _score_model()
    for name in ("nope", "Bands", "", "conv-gain"):
        with pytest.raises(InputError, match="calibration family"):
            make_calibration(name, model)
    with pytest.raises(InputError, match="nope"):
        BiasReconSettings(calibration_family="nope")
    for family in FAMILIES:
        assert BiasReconSettings(calibration_family=family).calibration_family == family
    assert BiasReconSettings().calibration_family == "norm_affine"  # the default (calibration_study.md)
    with pytest.raises(InputError, match="no layer"):
        ConvGain(nn.Sequential(nn.Conv2d(1, 1, 1)))  # only the output conv
    with pytest.raises(InputError, match="no layer"):
        NormAffine(_conv_net())
    with pytest.raises(InputError, match="decoder"):
        FreeU(_conv_net())
    with pytest.raises(InputError, match="decoder"):
        make_calibration("freeu", _conv_net())
    with pytest.raises(InputError, match="sigma_range"):
        SigmaIn(model, (0.01, 0.5))
    with pytest.raises(InputError, match="sigma_range"):
        make_calibration("residual_bands", model, sigma_range=(0.5, 0.0))
    for family in LEVEL_FAMILIES:
        with pytest.raises(InputError):
            make_calibration(family, "not a module")


@pytest.mark.parametrize("family", ["conv_gain", "norm_affine", "freeu"])
def test_a_module_that_is_not_an_nn_module_is_an_input_error(family):
    with pytest.raises(InputError, match="nn.Module"):
        make_calibration(family, "not a module")


@pytest.mark.parametrize("family", FAMILIES)
def test_biasrecon_fits_the_settings_family(family):
    model = _score_model()
    h, w = 16, 12
    maps = torch.ones(1, 2, h, w, dtype=torch.complex64) / math.sqrt(2)
    mask = torch.zeros(h, w)
    mask[:, ::2] = 1
    mask[:, 4:8] = 1
    op = Sense(maps, mask)
    y = op.A(_image(shape=(1, 1, h, w)))
    settings = BiasReconSettings(num_steps=4, sigma_start=0.4, sigma_end=0.02, sure=False, acs_auto=False,
                                 calibration_family=family, calibrate_below=None)  # D_γ at every level
    opt = BiasRecon(model, op, y, settings, sampler=TweedieSampler())
    calib = opt.calibration
    assert calib.family == family
    assert isinstance(calib, FrequencyCalibration) == (family == "bands")
    assert opt.prior is calib and calib.attached and opt.params == [calib.gamma]
    if family in LEVEL_FAMILIES:
        assert calib.sigma_range == (0.4, 0.02)  # the schedule's levels
    with torch.no_grad():
        x = _image(shape=(1, 1, h, w))
        assert torch.equal(_bits(opt.prior.denoise(x, 0.1)), _bits(model.denoise(x, 0.1)))
    calib.detach()


# --------------------------------------------------------------------------------------------
# decoder stages
# --------------------------------------------------------------------------------------------


def _record_channels(store, key):
    def hook(_module, _inputs, output):
        store.setdefault(key, []).append(output.shape[1])

    return hook


@pytest.mark.parametrize("mults", [(1, 2), (1, 2, 2, 4)])
def test_decoder_stages_of_the_score_unet(mults):
    model = _score_model(channel_mults=mults, base_channels=4)
    net = model.network
    stages = decoder_stages(model)
    assert len(stages) == len(mults) == len(net.decoder)
    assert [n for n, _, _ in stages] == [f"network.decoder.{i}.0" for i in range(len(mults))]
    assert [m for _, m, _ in stages] == [stage[0] for stage in net.decoder]
    # the backbone: what enters cat([h, skip]) from below, i.e. the middle block's, then each upsampler's output
    producers = [net.middle2.conv2] + [up.conv for up in net.upsamplers]
    assert [c for _, _, c in stages] == [p.out_channels for p in producers]
    assert [m.conv1.in_channels - c for _, m, c in stages] == [4 * m for m in reversed(mults)]  # the skips
    # and at run time
    store = {}
    handles = [p.register_forward_hook(_record_channels(store, i)) for i, p in enumerate(producers)]
    handles += [m.register_forward_pre_hook(lambda mod, args, i=i: store.update({("in", i): args[0].shape[1]}))
                for i, (_, m, _) in enumerate(stages)]  # dict.update returns None: the input is left alone
    with torch.no_grad():
        model.denoise(_image(), 0.1)
    for h in handles:
        h.remove()
    for i, (_, m, c) in enumerate(stages):
        assert store[i] == [c]
        assert store[("in", i)] == m.conv1.in_channels


@pytest.mark.parametrize("num_pool_layers", [2, 4])
def test_decoder_stages_of_the_fastmri_unet(num_pool_layers):
    unet = _unet(num_pool_layers=num_pool_layers, chans=2)
    stages = decoder_stages(unet)
    assert len(stages) == num_pool_layers
    last = num_pool_layers - 1
    assert [n for n, _, _ in stages] == [f"up_conv.{i}" for i in range(last)] + [f"up_conv.{last}.0"]
    assert [m for _, m, _ in stages] == list(unet.up_conv[:last]) + [unet.up_conv[last][0]]
    assert [c for _, _, c in stages] == [t.layers[0].out_channels for t in unet.up_transpose_conv]
    assert [m.in_chans - c for _, m, c in stages] == [m.out_chans for _, m, _ in stages]  # skip = the stage width
    store = {}
    handles = [t.register_forward_hook(_record_channels(store, i)) for i, t in enumerate(unet.up_transpose_conv)]
    with torch.no_grad():
        unet(torch.randn(1, 2, 32, 32, generator=_gen(7)))
    for h in handles:
        h.remove()
    assert [store[i] for i in range(num_pool_layers)] == [[c] for _, _, c in stages]


def test_decoder_stages_needs_a_decoder():
    with pytest.raises(InputError, match="decoder"):
        decoder_stages(_conv_net())


@pytest.mark.parametrize("family", ["residual_bands", "sigma_in", "sigma_residual"])
def test_a_detached_level_family_denoises_as_the_prior(family):
    """As the hook families: γ acts only while attached (BiasRecon detaches when its run ends)."""
    model = _score_model()
    x = torch.randn(2, 1, 16, 12, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model.denoise(x, 0.1)
        calib = make_calibration(family, model, sigma_range=(0.5, 0.01)).attach()
        calib.gamma.fill_(0.3)
        assert not torch.equal(calib.denoise(x, 0.1), plain)
        calib.detach()
        assert torch.equal(_bits(calib.denoise(x, 0.1)), _bits(plain))


@pytest.mark.parametrize("family", ["norm_affine", "sigma_in"])
def test_a_calibration_below_a_level_is_the_prior_as_trained_above_it_also_as_a_saved_profile(family, tmp_path):
    """``below`` (biasrecon.calibrate_below): a :class:`CalibratedPrior` is the module's own denoiser, bit for bit, at
    levels above it and the calibrated one at and below it; a saved profile keeps ``below`` and refuses a calibration
    with another one, naming the key."""
    from recon.adapt.families import CalibratedPrior, CalibrationShape
    from recon.adapt.profiles import apply_profile, load_profile, save_profile

    model, x = _score_model(), _image()
    shape = CalibrationShape(family, sigma_range=SIGMA_RANGE, below=0.05)
    calib = shape.build(model)
    with torch.no_grad():
        calib.gamma.normal_(0.0, 0.3, generator=_gen(2))
    value = CalibratedPrior(model, calib.gamma, shape)
    everywhere = CalibrationShape(family, sigma_range=SIGMA_RANGE).build(model)  # the same γ at every level
    with torch.no_grad():
        everywhere.gamma.copy_(calib.gamma)
        for sigma in (0.2, 0.05, 0.02):
            with everywhere:
                calibrated = everywhere.denoise(x, sigma)
            with calib:
                gated = calib.denoise(x, sigma)
                assert calib.attached  # hooks off for a level above below, back on after
            plain = model.denoise(x, sigma)
            assert not torch.equal(calibrated, plain)
            expected = plain if sigma > 0.05 else calibrated
            assert torch.equal(value.denoise(x, sigma), expected) and torch.equal(gated, expected)
    assert all(counts == (0, 0) for counts in _hook_counts(model).values())  # nothing left attached
    path = save_profile(tmp_path / "p.json", calib, "site", "prior")
    assert load_profile(path).below == 0.05
    apply_profile(path, CalibrationShape(family, sigma_range=SIGMA_RANGE, below=0.05).build(model))
    for other in (None, 0.1):
        with pytest.raises(InputError, match="key 'below' is 0.05"):
            apply_profile(path, CalibrationShape(family, sigma_range=SIGMA_RANGE, below=other).build(model))
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(InputError, match="below"):
            make_calibration(family, model, sigma_range=SIGMA_RANGE, below=bad)
