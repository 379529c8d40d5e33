"""ScoreModel: complex packing, EDM preconditioning, Tweedie score."""

from __future__ import annotations

import pytest
import torch

from scores.config import NetworkConfig
from scores.model import ScoreModel, channels_to_complex, complex_noise, complex_to_channels, score_from_denoised
from scores.train import dsm_loss

TINY = NetworkConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=False, emb_channels=16,
                     sigma_data=0.5)


def _model(perturb: bool = True) -> ScoreModel:
    model = ScoreModel.from_config(TINY, generator=torch.Generator().manual_seed(0))
    if perturb:
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_packing_round_trip_and_layout() -> None:
    x = complex_noise((3, 1, 5, 6), torch.Generator().manual_seed(0))
    packed = complex_to_channels(x)
    assert packed.shape == (3, 2, 5, 6) and packed.dtype == torch.float32
    assert torch.equal(packed[:, 0], x.real[:, 0]) and torch.equal(packed[:, 1], x.imag[:, 0])
    assert torch.equal(channels_to_complex(packed), x)


def test_complex_noise_has_unit_variance_per_real_channel() -> None:
    z = complex_noise((4000, 1, 8, 8), torch.Generator().manual_seed(1))
    r = torch.view_as_real(z)
    assert abs(r.var().item() - 1.0) < 0.01 and abs(r.mean().item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([r[..., 0].flatten(), r[..., 1].flatten()]))[0, 1].item()) < 0.01


def test_fresh_model_is_mmse_for_gaussian_data_and_edm_loss_is_one() -> None:
    """Zero-initialised output => D = c_skip x, the exact MMSE denoiser of N(0, sigma_data^2) data.

    With EDM weighting the expected loss of that denoiser is exactly 1 at every noise level.
    """
    model = _model(perturb=False)
    x = complex_noise((2, 1, 6, 6), torch.Generator().manual_seed(2))
    s = 0.7
    torch.testing.assert_close(model.denoise(x, s), 0.25 / (0.25 + s**2) * x)
    x0 = 0.5 * complex_noise((512, 1, 8, 8), torch.Generator().manual_seed(3))
    loss = dsm_loss(model, x0, torch.Generator().manual_seed(4), sigma_min=0.002, sigma_max=80.0)
    assert abs(loss.item() - 1.0) < 0.03, loss.item()


def test_score_is_tweedie_of_denoiser_and_sigma_may_be_per_sample() -> None:
    model = _model()
    x = complex_noise((3, 1, 7, 9), torch.Generator().manual_seed(5))
    sig = torch.tensor([0.1, 1.0, 10.0])
    d = model.denoise(x, sig)
    assert d.dtype == torch.complex64 and d.shape == x.shape
    for b in range(3):
        torch.testing.assert_close(d[b : b + 1], model.denoise(x[b : b + 1], float(sig[b])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.score(x, sig), (d - x) / sig[:, None, None, None] ** 2)
    torch.testing.assert_close(score_from_denoised(d, x, 2.0), (d - x) / 4.0)
    torch.testing.assert_close(model(x, sig), d)


def test_preconditioning_limits() -> None:
    model = _model()
    sigma = torch.tensor([1e-4, 0.5, 1e3], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = model.preconditioning(sigma)
    assert c_skip[0] > 0.9999 and c_skip[2] < 1e-6  # identity at low noise, network at high noise
    # EDM: the residual the network must predict, (x0 - c_skip x) / c_out, has unit variance for N(0, sd^2) data
    torch.testing.assert_close((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2, c_out**2)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 0.25))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)


def test_bad_inputs_are_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="complex"):
        model.denoise(torch.randn(1, 1, 4, 4), 1.0)
    with pytest.raises(ValueError, match="complex"):
        model.denoise(torch.zeros(1, 2, 4, 4, dtype=torch.complex64), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        model.denoise(torch.zeros(2, 1, 4, 4, dtype=torch.complex64), torch.ones(3))


def test_blocks_delegate_to_network() -> None:
    model = _model()
    assert model.blocks == model.network.blocks and len(model.blocks) == 6
