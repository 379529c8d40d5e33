"""BiasRecon: the guard, determinism, the SURE λ-step, and a measured gain from calibration."""

import dataclasses
import math

import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch
from torch import nn

from recon.adapt import density_weights, detect_acs, heldout_loss
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.dc import prox
from recon.errors import InputError
from recon.metrics import psnr
from recon.operators import Sense
from recon.sure import estimate_sigma, residual_sigma
from scores.samplers import TweedieSampler  # the one sampler loop (recon sees it through a Protocol)

H = W = 48
COILS = 4


class BlurDenoiser(nn.Module):
    """A frozen, miscalibrated 'prior': two fixed Gaussian blurs with gain ``gain`` each on the
    real/imaginary channels — it darkens and over-smooths, as a prior from another site would.

    Its two blocks are what ``FrequencyCalibration(layers="auto")`` hooks (2 layers × 3 bands).
    """

    def __init__(self, width: float = 0.8, gain: float = 0.8) -> None:
        super().__init__()
        t = torch.arange(-3, 4, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / width) ** 2)
        kernel = gain * (g[:, None] * g[None, :]) / g.sum() ** 2
        self.blocks = nn.ModuleList([nn.Conv2d(2, 2, 7, padding=3, bias=False, groups=2) for _ in range(2)])
        for conv in self.blocks:
            conv.weight.data[:] = kernel
            conv.weight.requires_grad_(False)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        h = torch.cat([x.real, x.imag], dim=1).float()
        for conv in self.blocks:
            h = conv(h)
        return torch.complex(h[:, :1], h[:, 1:])


def _problem(seed: int = 0, sigma: float = 0.01, density: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    img = torch.from_numpy(np.real(sigpy.shepp_logan((H, W)))).float()[None, None].to(torch.complex64)
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((COILS, H, W))).to(torch.complex64)[None]
    cols = (torch.rand(W, generator=g) < density).float()
    cols[W // 2 - 3: W // 2 + 3] = 1
    op = Sense(maps, cols.expand(H, W).clone())
    noise = sigma / math.sqrt(2) * torch.view_as_complex(torch.randn(1, COILS, H, W, 2, generator=g))
    y = op.A(img) + op.mask * noise
    return op, y, img, sigma


SETTINGS = dict(calibration_family="bands", num_steps=8, num_samples=1, sigma_start=0.3, sigma_end=0.01, theta_steps=4, adapt_fraction=1.0, lr=0.03,
                lam=0.01, sure=False, acs_fraction=0.1, cg_iters=8, seed=3, calib_iterate="full", acs_auto=False,
                calibrate_below=None)  # the mechanics at every level; calibrate_below has its own test
SAMPLER = TweedieSampler()


def _optimizer(prior, op, y, settings):
    return BiasRecon(prior, op, y, settings, sampler=SAMPLER)


def _psnr(img, ref):
    return psnr(ref.abs()[:, 0].numpy(), img.abs()[:, 0].numpy())


def test_calibration_lowers_the_heldout_loss_of_a_miscalibrated_prior():
    """The θ-steps find γ that undo most of a 0.8×0.8 gain: the whole chain, run on y_Θv alone,
    predicts the held-out k-space y_Λv better than at γ = 0 (the quantity the method optimises)."""
    op, y, _, _ = _problem()
    # the θ-steps' own fit: the guard keeps the whole γ or nothing (its scaled candidates are tested below)
    adapted = _optimizer(BlurDenoiser(width=0.5), op, y,
                         BiasReconSettings(**SETTINGS, adapt="gamma", guard_scales=(1.0,))).run()
    assert adapted.val_loss_best < 0.97 * adapted.val_loss_zero
    low_band = adapted.gamma[:, 0]
    assert bool((low_band > 0.2).all()) and bool((low_band < 0.6).all())  # (1 + γ)² · 0.64 ≈ 1 needs γ ≈ 0.25


def test_guard_restores_gamma_zero_when_adaptation_hurts_the_reconstruction():
    """With a step size this large, single-denoising scores improve but the chain's held-out loss does
    not: the guard must return γ = 0 and exactly the unadapted reconstruction."""
    op, y, img, _ = _problem()
    prior = BlurDenoiser()
    unadapted = _optimizer(prior, op, y, BiasReconSettings(**SETTINGS, adapt="none")).run()
    wild = _optimizer(prior, op, y, BiasReconSettings(**{**SETTINGS, "lr": 1.0}, adapt="gamma")).run()
    assert wild.val_loss_best == wild.val_loss_zero
    assert torch.count_nonzero(wild.gamma) == 0
    torch.testing.assert_close(wild.image, unadapted.image, rtol=0, atol=0)
    # the prior is left as it was: no hooks, same output
    x = torch.randn(1, 1, H, W, dtype=torch.complex64)
    torch.testing.assert_close(prior.denoise(x, 0.1), BlurDenoiser().denoise(x, 0.1), rtol=0, atol=0)
    assert not any(conv._forward_hooks for conv in prior.blocks)


@pytest.mark.parametrize("lr", [0.03, 1.0])
def test_guard_scales_keep_the_candidate_whose_chain_predicts_the_heldout_data_best(lr):
    """guard_scales (0.25, 0.5, 1), the default: the same calibration as (1,), then the guard keeps t·γ_best for the t whose
    chain on y_Θv predicts y_Λv best (recomputed here for each candidate), or γ = 0 if none beats it."""
    op, y, _, _ = _problem()
    settings = {**SETTINGS, "lr": lr}
    single = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**settings, adapt="gamma", guard_scales=(1.0,)))
    single.calibrate()
    scales = (0.25, 0.5, 1.0)
    several = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**settings, adapt="gamma", guard_scales=scales))
    several.calibrate()
    kept = several.params[0].detach().clone()
    gamma_best = torch.tensor(several.history[-1]["gamma"])  # the θ-steps' best γ, before the guard
    assert gamma_best.tolist() == single.history[-1]["gamma"]  # the same calibration
    losses = {}
    probe = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**settings, adapt="gamma"))
    for t in (0.0, *scales):
        probe._set_params([t * gamma_best.reshape(probe.params[0].shape)])
        losses[t] = probe.chain_heldout_loss()
    chosen = min(losses, key=losses.get)
    assert several.val_loss_zero == pytest.approx(losses[0.0], rel=1e-5)
    assert several.val_loss_best == pytest.approx(losses[chosen], rel=1e-5)
    torch.testing.assert_close(kept, chosen * gamma_best.reshape(kept.shape), rtol=1e-5, atol=1e-6)
    assert several.val_loss_best <= single.val_loss_best + 1e-6  # never worse than keep-or-nothing


@pytest.mark.parametrize("selection", ["validation", "last"])
def test_step_selection_denoises_with_the_best_so_far_or_adams_latest_iterate(selection):
    """step_selection: after each θ-step the x-step denoises with the parameters of lowest validation loss so far
    ("validation") or with Adam's latest iterate ("last"); the final guard judges either."""
    op, y, _, _ = _problem()
    settings = BiasReconSettings(**{**SETTINGS, "lr": 1.0}, adapt="gamma", step_selection=selection)
    opt = _optimizer(BlurDenoiser(), op, y, settings)
    start_loss = opt.val_loss_zero  # the validation loss at γ = 0
    seen = []  # (γ the x-step uses, Adam's iterate, validation loss of the iterate)

    def look(record: dict) -> None:
        used = opt.calibration.gamma.detach().clone()
        opt._set_params(opt._iterate)
        seen.append((used, opt._iterate[0].clone(), opt._validation_loss()))
        opt._set_params([used])

    opt.calibrate(callback=look)
    used, iterates, val = zip(*seen)
    if selection == "last":
        assert all(torch.equal(u, i) for u, i in zip(used, iterates))
    else:  # the iterate of least validation loss so far (γ = 0 before any step)
        best, best_loss = torch.zeros_like(iterates[0]), start_loss
        for u, i, v in zip(used, iterates, val):
            if v < best_loss:
                best, best_loss = i, v
            assert torch.equal(u, best)
        assert any(not torch.equal(u, i) for u, i in zip(used, iterates))  # lr 1.0 overshoots: selection matters
    assert opt.val_loss_best <= opt.val_loss_zero  # the guard keeps a candidate only if its chain beats γ = 0's


def test_validation_loss_is_the_mean_over_geometric_levels_around_the_schedules_middle():
    """validation_levels n: σ_i = σ_start^(1−q) σ_end^q at q = i/(n+1); n = 1 is the middle level alone (as before),
    and the loss is the mean of the one-level losses, each with its own fixed input."""
    op, y, _, _ = _problem()
    one = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**SETTINGS, adapt="gamma"))
    three = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**SETTINGS, adapt="gamma", validation_levels=3))
    a, b = one.sigmas[0], one.sigmas[-1]
    assert one.val_sigmas == [math.sqrt(a * b)]
    assert three.val_sigmas == pytest.approx([a ** 0.75 * b ** 0.25, math.sqrt(a * b), a ** 0.25 * b ** 0.75])
    singles = []
    for x, sigma in zip(three.val_xs, three.val_sigmas):
        one.val_xs, one.val_sigmas = [x], [sigma]
        singles.append(one._validation_loss())
    assert three._validation_loss() == pytest.approx(sum(singles) / 3, rel=1e-6)
    assert len(set(singles)) == 3  # three different levels
    with pytest.raises(InputError, match="validation_levels"):
        BiasReconSettings(validation_levels=0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_sets_adams_step_of_every_calibration_update(schedule):
    """lr_schedule "cosine": update k of T = levels × θ-steps uses lr · (1 + cos(πk/T)) / 2; "constant": lr."""
    op, y, _, _ = _problem()
    opt = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**SETTINGS, adapt="gamma", lr_schedule=schedule))
    steps, step = [], opt.optimizer.step

    def record(*args, **kwargs):
        steps.append(opt.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    opt.optimizer.step = record
    opt.calibrate()
    total = opt.adapt_steps * SETTINGS["theta_steps"]
    lr = SETTINGS["lr"]
    expected = [lr] * total if schedule == "constant" else \
        [0.5 * lr * (1 + math.cos(math.pi * k / total)) for k in range(total)]
    assert steps == pytest.approx(expected, rel=1e-12)
    with pytest.raises(InputError, match="lr_schedule"):
        BiasReconSettings(lr_schedule="linear")


def test_full_finetuning_leaves_the_prior_untouched_and_respects_the_guard():
    op, y, _, _ = _problem()
    prior = BlurDenoiser()
    before = [p.clone() for p in prior.parameters()]
    result = _optimizer(prior, op, y, BiasReconSettings(**SETTINGS, adapt="full")).run()
    assert result.val_loss_best <= result.val_loss_zero and result.gamma is None
    assert all(torch.equal(a, b) for a, b in zip(before, prior.parameters()))


def test_chain_is_deterministic_and_run_uses_it():
    op, y, _, _ = _problem()
    st = BiasReconSettings(**SETTINGS, adapt="none")
    a, _ = _optimizer(BlurDenoiser(), op, y, st).x_step_chain(op, y, st.lam)
    b, _ = _optimizer(BlurDenoiser(), op, y, st).x_step_chain(op, y, st.lam)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(_optimizer(BlurDenoiser(), op, y, st).run().image, a, rtol=0, atol=0)


def test_num_samples_averages_the_chains_of_consecutive_seeds():
    """K samples = the mean of the single-sample chains with seeds seed..seed+K-1 (x₀ and x̂ alike),
    different from every single sample; run() returns it."""
    op, y, img, _ = _problem()
    base = {**SETTINGS, "eta": 1.0}
    singles = [_optimizer(BlurDenoiser(), op, y, BiasReconSettings(**{**base, "seed": 3 + k}, adapt="none"))
               .x_step_chain(op, y, 0.01) for k in range(3)]
    st = BiasReconSettings(**{**base, "num_samples": 3}, adapt="none")
    x0, x_hat = _optimizer(BlurDenoiser(), op, y, st).x_step_chain(op, y, 0.01)
    torch.testing.assert_close(x0, sum(s[0] for s in singles) / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_hat, sum(s[1] for s in singles) / 3, rtol=1e-5, atol=1e-6)
    assert all(not torch.allclose(x0, s[0]) for s in singles)
    torch.testing.assert_close(_optimizer(BlurDenoiser(), op, y, st).run().image, x0, rtol=0, atol=0)
    with pytest.raises(InputError, match="num_samples"):
        BiasReconSettings(num_samples=0)


def test_sure_lambda_step_picks_its_curve_minimum_and_returns_that_prox():
    op, y, _, sigma = _problem(sigma=0.05)
    for refine in (False, True):  # the grid alone; the grid, then golden-section points between neighbours
        st = BiasReconSettings(**{**SETTINGS, "sure": True, "lam_grid": (0.001, 0.01, 0.1, 1.0)}, adapt="none",
                               noise_sigma=sigma, sure_refine=refine)
        result = _optimizer(BlurDenoiser(), op, y, st).run()
        lams, values = zip(*result.sure_curve)
        assert lams[:4] == st.lam_grid and (len(lams) > 4) == refine
        assert result.lam == lams[int(np.argmin(values))]
        _, x_hat = _optimizer(BlurDenoiser(), op, y, st).x_step_chain(op, y, st.lam)
        torch.testing.assert_close(result.image, prox(op, y, x_hat, result.lam, st.cg_iters), rtol=1e-5, atol=1e-6)


def test_lambda_step_is_the_chain_then_the_choice_and_the_choice_takes_another_sigma():
    """``lambda_step`` = ``sure_chain`` (run the chain once) then ``choose_lambda`` (SURE over the grid on it)."""
    op, y, _, sigma = _problem(sigma=0.05)
    st = BiasReconSettings(**{**SETTINGS, "sure": True, "lam_grid": (0.001, 0.01, 0.1, 1.0)}, adapt="none",
                           noise_sigma=sigma)
    lam, image, curve, fixed = _optimizer(BlurDenoiser(), op, y, st).lambda_step()
    recon = _optimizer(BlurDenoiser(), op, y, st)
    chain = recon.sure_chain()
    assert chain.ys.shape[0] == 2 * y.shape[0] and chain.epsilon == st.sure_epsilon * recon.sure_sigma
    torch.testing.assert_close(chain.fixed, fixed, rtol=0, atol=0)
    lam2, image2, curve2 = recon.choose_lambda(chain)
    assert (lam2, curve2) == (lam, curve)
    torch.testing.assert_close(image2, image, rtol=0, atol=0)
    torch.testing.assert_close(chain.prox(lam)[: y.shape[0]], image, rtol=0, atol=0)
    lam_big, _, curve_big = recon.choose_lambda(chain, sigma=100 * recon.sure_sigma)  # a σ that swamps the data
    assert lam_big == max(lam for lam, _ in curve_big) and curve_big != curve


def test_sure_tracks_the_true_measurement_risk_of_the_final_prox():
    """Averaged over noise draws, SURE(λ) of the whole chain equals ‖A x₀(λ) − A x_true‖²."""
    op, _, img, sigma = _problem(sigma=0.05)
    st = BiasReconSettings(**{**SETTINGS, "sure": True, "lam_grid": (0.01, 1.0)}, adapt="none", noise_sigma=sigma,
                           sure_refine=False, sure_sigma="noise")  # the two grid points, the true σ
    diffs = {lam: [] for lam in st.lam_grid}
    for draw in range(8):
        g = torch.Generator().manual_seed(100 + draw)
        noise = sigma / math.sqrt(2) * torch.view_as_complex(torch.randn(1, COILS, H, W, 2, generator=g))
        y = op.A(img) + op.mask * noise
        result = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**{**st.__dict__, "seed": draw})).run()
        _, x_hat = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**{**st.__dict__, "seed": draw})).x_step_chain(
            op, y, st.lam)
        for lam, value in result.sure_curve:
            risk = float(torch.sum(torch.abs(op.A(prox(op, y, x_hat, lam, st.cg_iters)) - op.A(img)) ** 2))
            diffs[lam].append(value - risk)
    m = int(torch.count_nonzero(op.mask)) * COILS
    for lam, d in diffs.items():
        d = np.array(d)
        assert abs(d.mean()) < 4 * d.std() / math.sqrt(len(d)) + 0.02 * m * sigma**2, (lam, d.mean(), d.std())


def test_bad_settings_and_shapes_are_refused():
    op, y, _, _ = _problem()
    with pytest.raises(InputError, match="sigma_start"):
        BiasReconSettings(sigma_start=0.01, sigma_end=0.1)
    with pytest.raises(InputError, match="adapt"):
        BiasReconSettings(adapt="everything")
    for scales in ((), (0.0, 1.0), (float("nan"),), ("half",)):
        with pytest.raises(InputError, match="guard_scales"):
            BiasReconSettings(guard_scales=scales)
    assert BiasReconSettings(guard_scales=[1, 0.5]).guard_scales == (1.0, 0.5)  # a YAML list becomes floats
    with pytest.raises(InputError, match="heldout_weighting"):
        BiasReconSettings(heldout_weighting="voronoi")
    with pytest.raises(InputError, match="split_sampling"):
        BiasReconSettings(split_sampling="uniform")
    with pytest.raises(InputError, match="expected"):
        _optimizer(BlurDenoiser(), op, y[..., :-1], BiasReconSettings(**SETTINGS))


def test_theta_iterate_never_sees_the_heldout_calibration_data():
    """calib_iterate="theta": the calibration's iterate is built from y_Θc alone, so changing y on Λc
    leaves it unchanged (with "full" the earlier x-steps carry y_Λ into it: a leak). A vanishing learning
    rate keeps γ ≈ 0, so that only the data path differs."""
    op, y, _, _ = _problem()
    few = {**SETTINGS, "lr": 1e-12, "theta_steps": 1, "num_steps": 3}  # three calibration steps
    st = BiasReconSettings(**{**few, "calib_iterate": "theta"}, adapt="gamma")
    a = _optimizer(BlurDenoiser(width=0.5), op, y, st)
    lam_c = a.calib_lambda
    assert float(lam_c.sum()) > 0 and not bool((a.calib_op.mask * lam_c).any()) and not bool((a.calib_y * lam_c).any())
    b = _optimizer(BlurDenoiser(width=0.5), op, y + 0.5 * lam_c * y, st)
    a.calibrate(), b.calibrate()
    assert len(a.history) == 3
    torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-6)
    leaky = BiasReconSettings(**few, adapt="gamma")
    c, d = (_optimizer(BlurDenoiser(width=0.5), op, yy, leaky) for yy in (y, y + 0.5 * lam_c * y))
    c.calibrate(), d.calibrate()
    assert float((c.x - d.x).abs().max()) > 1e-3
    for optimizer in (a, b, c, d):
        optimizer.calibration.detach()


def test_theta_iterate_calibrates_under_the_guard_and_calibrate_then_run_is_run():
    """The fixed calibration split lies inside Θ_v, so its few held-out lines fit γ well only at low noise
    (from σ = 0.3 the blur's best gain is a shrinkage that does not carry over to Λ_v): start at σ = 0.05."""
    op, y, _, _ = _problem()
    st = BiasReconSettings(**{**SETTINGS, "calib_iterate": "theta", "sigma_start": 0.05}, adapt="gamma")
    fresh = _optimizer(BlurDenoiser(width=0.5), op, y, st).run()
    assert fresh.val_loss_best < 0.99 * fresh.val_loss_zero and bool(torch.count_nonzero(fresh.gamma))
    split = _optimizer(BlurDenoiser(width=0.5), op, y, st)
    split.calibrate()  # mode site: fit γ once, guarded like run()
    assert split.calibrated and split.calibration.attached
    torch.testing.assert_close(split.calibration.gamma.detach(), fresh.gamma, rtol=0, atol=0)
    again = split.run()
    torch.testing.assert_close(again.image, fresh.image, rtol=0, atol=0)
    assert again.val_loss_best == fresh.val_loss_best and again.val_loss_zero == fresh.val_loss_zero
    with pytest.raises(InputError, match="calib_iterate"):
        BiasReconSettings(calib_iterate="heldout")


def test_acs_auto_holds_out_only_entries_outside_the_scans_fully_sampled_centre():
    op, y, _, _ = _problem()
    st = BiasReconSettings(**{**SETTINGS, "acs_fraction": 0.01, "calib_iterate": "theta", "acs_auto": True}, adapt="gamma")
    br = _optimizer(BlurDenoiser(width=0.5), op, y, st)
    centre = (op.mask[0] != 0) & (torch.arange(W) >= W // 2 - 3) & (torch.arange(W) < W // 2 + 3)
    for held in (br.calib_lambda, br.val_lambda):
        assert float(held.sum()) > 0 and not bool((held.expand(H, W)[:, centre] != 0).any())
    br.calibration.detach()
    # a scan that samples only its centre (plus a line touching it) falls back to acs_fraction
    cols = torch.zeros(W)
    cols[W // 2 - 6: W // 2 + 6] = 1
    narrow = Sense(op.sens_maps, cols.expand(H, W).clone())
    st = BiasReconSettings(**{**SETTINGS, "acs_fraction": 0.1, "calib_iterate": "theta", "acs_auto": True}, adapt="gamma")
    br = _optimizer(BlurDenoiser(width=0.5), narrow, narrow.A(narrow.A_adjoint(y)), st)
    assert float(br.calib_lambda.sum()) > 0
    br.calibration.detach()


def test_stratified_sampling_spreads_the_guards_and_the_calibrations_heldout_columns_over_the_frequencies():
    """split_sampling=stratified: Λ_v takes one column per |k_x| stratum of the scan's sampled non-ACS columns, and the
    calibration's Λc one per stratum of Θ_v's; the plain draw (same seed) is not spread so."""
    op, y, _, _ = _problem(density=0.5)
    kx = (torch.arange(W) - W // 2).abs().double()
    centre = detect_acs(op.mask)[0] != 0

    def spread(held: torch.Tensor, pool: torch.Tensor) -> bool:
        r, h = torch.sort(kx[pool & ~centre]).values, torch.sort(kx[held.expand(H, W)[0] != 0]).values
        n, m = r.numel(), h.numel()
        return all(r[j * n // m] <= h[j] <= r[(j + 1) * n // m - 1] for j in range(m))

    found = {}
    for sampling in ("stratified", "random"):
        st = BiasReconSettings(**{**SETTINGS, "calib_iterate": "theta", "acs_auto": True}, adapt="gamma",
                               split_sampling=sampling)
        br = _optimizer(BlurDenoiser(width=0.5), op, y, st)
        found[sampling] = (spread(br.val_lambda, op.mask[0] != 0),
                           spread(br.calib_lambda, br.val_theta.expand(H, W)[0] != 0))
        br.calibration.detach()
    assert found["stratified"] == (True, True)
    assert found["random"] != (True, True)


def test_calibrate_below_calibrates_only_the_low_noise_levels():
    """calibrate_below: above the level the denoiser is the prior as trained, bit for bit, and a θ-step fits
    nothing; at and below it the calibrated denoiser, and the θ-step moves γ; the hooks stay attached."""
    op, y, _, _ = _problem()
    prior = BlurDenoiser(width=0.5)
    br = _optimizer(prior, op, y, BiasReconSettings(**{**SETTINGS, "calibrate_below": 0.05}, adapt="gamma"))
    with torch.no_grad():
        br.calibration.gamma.copy_(0.3 * torch.randn(br.calibration.gamma.shape, generator=torch.Generator().manual_seed(1)))
    x = y.new_zeros(1, 1, H, W) + torch.complex(torch.randn(1, 1, H, W), torch.randn(1, 1, H, W))
    with torch.no_grad():
        high, low = br.prior.denoise(x, 0.2), br.prior.denoise(x, 0.05)
        assert br.calibration.attached
        calibrated = br.calibration.denoise(x, 0.05)
        br.calibration.detach()
        plain_high, plain_low = prior.denoise(x, 0.2), prior.denoise(x, 0.05)
        br.calibration.attach()
    assert torch.equal(high, plain_high)
    assert torch.equal(low, calibrated) and not torch.equal(low, plain_low)
    assert br.val_sigmas == [0.05]  # the schedule's middle (0.055) capped: the step selection scores where γ acts
    before = br.calibration.gamma.detach().clone()
    assert math.isnan(br.theta_step(x, 0.2)) and torch.equal(br.calibration.gamma.detach(), before)
    assert math.isfinite(br.theta_step(x, 0.04)) and not torch.equal(br._iterate[0], before)
    br.calibration.detach()
    for value in (0.0, -1.0, float("inf")):
        with pytest.raises(InputError, match="calibrate_below"):
            BiasReconSettings(calibrate_below=value)
    # a schedule whose calibration levels all lie above it: refused up front, the prior left without hooks
    short = BiasReconSettings(**{**SETTINGS, "calibrate_below": 0.05, "adapt_fraction": 0.25}, adapt="gamma")
    with pytest.raises(InputError, match="calibrate_below=0.05 leaves no level to calibrate"):
        _optimizer(prior, op, y, short)
    assert all(not m._forward_hooks for m in prior.modules())


def test_noise_rule_sets_the_chain_lambda_from_the_noise_level():
    """lam_rule="noise": the chain runs at λ = σ² / prior_error² — the same image as the fixed rule at that λ —
    and σ comes from the k-space when not given."""
    op, y, _, sigma = _problem(sigma=0.05)
    rule = BiasReconSettings(**{**SETTINGS, "sure": False}, adapt="none", lam_rule="noise", prior_error=0.1,
                             noise_sigma=sigma)
    result = _optimizer(BlurDenoiser(), op, y, rule).run()
    assert result.chain_lam == pytest.approx(sigma**2 / 0.1**2) and result.lam == result.chain_lam
    fixed = BiasReconSettings(**{**SETTINGS, "sure": False, "lam": sigma**2 / 0.1**2}, adapt="none")
    torch.testing.assert_close(result.image, _optimizer(BlurDenoiser(), op, y, fixed).run().image, rtol=0, atol=0)
    estimated = BiasReconSettings(**{**SETTINGS, "sure": False}, adapt="none", lam_rule="noise", prior_error=0.1)
    found = _optimizer(BlurDenoiser(), op, y, estimated).run()
    assert found.noise_sigma == estimate_sigma(y, op.mask)  # from the k-space periphery
    assert found.chain_lam == pytest.approx(found.noise_sigma**2 / 0.1**2)
    with pytest.raises(InputError, match="lam_rule"):
        BiasReconSettings(lam_rule="sure")


def test_lora_adapts_the_convolutions_under_the_guard_and_leaves_the_prior_untouched():
    """adapt="lora": rank-r updates of both convolutions lower the chain's held-out loss of the
    miscalibrated prior; Σ r (C_in/g · k² + C_out) values are fitted; the prior is left as it was."""
    op, y, _, _ = _problem()
    prior = BlurDenoiser(width=0.5)
    x = torch.randn(1, 1, H, W, dtype=torch.complex64)
    before = prior.denoise(x, 0.1)
    st = BiasReconSettings(**{**SETTINGS, "calib_iterate": "theta", "lr": 0.001, "sigma_start": 0.05}, adapt="lora",
                           lora_rank=2)  # low noise, as in the theta test above
    result = _optimizer(prior, op, y, st).run()
    assert result.val_loss_best < 0.99 * result.val_loss_zero and result.gamma is None
    assert result.num_adapted == 2 * 2 * (1 * 7 * 7 + 2)  # two layers, rank 2, grouped 7×7 convolutions
    torch.testing.assert_close(prior.denoise(x, 0.1), before, rtol=0, atol=0)
    assert not any(conv._forward_hooks for conv in prior.blocks)


def test_learned_lambda_moves_towards_the_data_and_its_image_is_the_chain_at_that_lambda():
    """adapt="lam": one learned data-consistency weight. Started at λ = 10 (trusting a darkening prior
    far too much) it falls, the held-out loss falls, and the image is the unadapted chain at the learned λ."""
    op, y, _, _ = _problem()
    st = BiasReconSettings(**{**SETTINGS, "lam": 10.0, "lr": 0.2, "calib_iterate": "theta"}, adapt="lam")
    result = _optimizer(BlurDenoiser(), op, y, st).run()
    assert result.num_adapted == 1 and result.lam == result.chain_lam
    assert result.lam < 5.0 and result.val_loss_best < result.val_loss_zero
    plain = BiasReconSettings(**{**SETTINGS, "lam": result.lam}, adapt="none")
    torch.testing.assert_close(result.image, _optimizer(BlurDenoiser(), op, y, plain).run().image,
                               rtol=1e-4, atol=1e-5)


def test_oracle_gamma_fits_the_reference_and_bounds_the_self_supervised_fit():
    """calib_loss="reference": γ fitted to the clean image. Its reconstruction is closer to the reference than
    the unadapted prior's and than the self-supervised γ's; without a reference it is refused."""
    from recon.biasrecon import reference_loss

    op, y, img, _ = _problem(sigma=0.001)
    prior = BlurDenoiser(width=0.5)
    base = {**SETTINGS, "calib_iterate": "theta", "lam": 1.0, "lr": 0.01}  # a λ at which the prior's darkening shows
    reference = img.abs()[:, :, 2:-2, 3:-3]  # a centre crop, as fastMRI's targets are
    oracle = BiasRecon(prior, op, y, BiasReconSettings(**base, adapt="gamma", calib_loss="reference"),
                       sampler=SAMPLER, reference=reference).run()
    selfsup = _optimizer(prior, op, y, BiasReconSettings(**base, adapt="gamma")).run()
    unadapted = _optimizer(prior, op, y, BiasReconSettings(**base, adapt="none")).run()
    err = {name: float(reference_loss(r.image, reference)) for name, r in
           (("oracle", oracle), ("selfsup", selfsup), ("unadapted", unadapted))}
    assert err["oracle"] < 0.9 * err["unadapted"] and err["oracle"] < err["selfsup"], err
    assert oracle.val_loss_best == pytest.approx(err["oracle"], rel=1e-4)  # the guard scores the chain on y
    # the loss itself: ‖crop(|x|) − r‖² / ‖r‖² by hand
    x = torch.randn(2, 1, 8, 10, dtype=torch.complex64)
    r = torch.rand(2, 1, 6, 6)
    by_hand = np.mean([float(((x[b, 0].abs()[1:7, 2:8] - r[b, 0]) ** 2).sum() / (r[b, 0] ** 2).sum()) for b in range(2)])
    assert float(reference_loss(x, r)) == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(InputError, match="reference"):
        _optimizer(prior, op, y, BiasReconSettings(**base, adapt="gamma", calib_loss="reference"))
    with pytest.raises(InputError, match="reference has shape"):
        BiasRecon(prior, op, y, BiasReconSettings(**base, adapt="gamma", calib_loss="reference"), sampler=SAMPLER,
                  reference=torch.ones(1, 1, H + 1, W))
    with pytest.raises(InputError, match="calib_loss"):
        BiasReconSettings(calib_loss="target")


def test_sure_run_returns_the_fixed_lambda_chain_as_the_method_without_sure():
    op, y, _, sigma = _problem(sigma=0.05)
    st = BiasReconSettings(**{**SETTINGS, "sure": True}, adapt="none", noise_sigma=sigma)
    with_sure = _optimizer(BlurDenoiser(), op, y, st).run()
    without = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**{**st.__dict__, "sure": False})).run()
    torch.testing.assert_close(with_sure.fixed_image, without.image, rtol=1e-4, atol=1e-5)
    assert without.fixed_image is without.image


def test_sure_weighs_its_divergence_with_the_regression_sigma_when_the_maps_do_not_explain_the_data():
    """Data from one coil geometry, reconstructed with maps of another: the least-squares fit leaves χ² > 2
    times the noise. ``sure_sigma="residual"`` (the default) runs SURE with the regression σ, which counts that
    misfit as noise, and so keeps more of the prior (a larger λ) than SURE with the noise σ; with maps that
    explain the data both σ agree to a few per cent."""
    import sigpy.mri

    op, y, _, sigma = _problem(sigma=0.02, density=0.5)
    grid = dict(lam_grid=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), sure_refine=False)
    for maps_radius, misfit_above in ((None, None), (1.0, 2.0)):
        if maps_radius is not None:
            maps = torch.from_numpy(sigpy.mri.birdcage_maps((COILS, H, W), r=maps_radius)).to(torch.complex64)[None]
            op = Sense(maps, op.mask)
        runs = {mode: _optimizer(BlurDenoiser(), op, y, BiasReconSettings(
            **{**SETTINGS, "sure": True, **grid}, adapt="none", noise_sigma=sigma, sure_sigma=mode)).run()
            for mode in ("noise", "residual")}
        assert runs["noise"].sure_sigma == sigma
        assert runs["residual"].sure_sigma == pytest.approx(residual_sigma(op, y))
        assert runs["residual"].misfit == pytest.approx((residual_sigma(op, y) / sigma) ** 2)
        if misfit_above is None:
            assert runs["residual"].misfit == pytest.approx(1.0, abs=0.1)
        else:
            assert runs["residual"].misfit > misfit_above
            assert runs["residual"].lam > 2 * runs["noise"].lam
    no_sure = _optimizer(BlurDenoiser(), op, y, BiasReconSettings(**SETTINGS, adapt="none")).run()
    assert no_sure.sure_sigma is None and no_sure.misfit is None
    with pytest.raises(InputError, match="sure_sigma"):
        BiasReconSettings(sure_sigma="corners")


def test_calibration_is_skipped_where_the_coil_maps_do_not_explain_the_data():
    """The misfit gate: with maps of another coil geometry (χ² > 2.5) the calibration does not run and the image is
    the unadapted prior's; with the true maps, or with the gate off, it runs as before."""
    import sigpy.mri

    op, y, img, sigma = _problem(sigma=0.02, density=0.5)
    wrong = Sense(torch.from_numpy(sigpy.mri.birdcage_maps((COILS, H, W), r=1.0)).to(torch.complex64)[None], op.mask)
    base = {**SETTINGS, "adapt_fraction": 0.5}

    def run(operator, **extra):
        return _optimizer(BlurDenoiser(), operator, y, BiasReconSettings(**base, noise_sigma=sigma, **extra)).run()

    gated = run(wrong)
    assert gated.misfit > 2.5 and "misfit_limit" in gated.calibration_skipped
    assert gated.history == [] and gated.val_loss_zero is None
    torch.testing.assert_close(gated.image, run(wrong, adapt="none").image)
    ungated = run(wrong, misfit_limit=None)
    assert ungated.calibration_skipped is None and ungated.history and ungated.misfit is None
    right = run(op)
    assert right.misfit < 1.5 and right.calibration_skipped is None and right.history
    oracle = BiasRecon(BlurDenoiser(), wrong, y, BiasReconSettings(**base, noise_sigma=sigma, calib_loss="reference"),
                       sampler=SAMPLER, reference=img.abs()).run()
    assert oracle.calibration_skipped is None and oracle.history  # the oracle bound is never gated
    with pytest.raises(InputError, match="misfit_limit"):
        BiasReconSettings(misfit_limit=-1.0)


def test_heldout_loss_is_density_weighted_on_a_variable_density_mask_only():
    op, y, img, sigma = _problem()  # 1-D columns: no compensation, the unweighted loss
    st = BiasReconSettings(**{**SETTINGS, "calib_iterate": "theta", "acs_auto": True}, adapt="gamma")
    br = _optimizer(BlurDenoiser(), op, y, st)
    assert br.heldout_weight is None
    br.calibration.detach()
    g = torch.Generator().manual_seed(5)  # a 2-D mask, dense at the centre: p = 0.9 (1 − u)² + 0.05
    k = (torch.arange(H, dtype=torch.float32) - H // 2).abs() / (H / 2)
    u = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    mask = (torch.rand(H, W, generator=g) < 0.9 * (1 - u).clamp(min=0) ** 2 + 0.05).float()
    mask[H // 2 - 3: H // 2 + 3, W // 2 - 3: W // 2 + 3] = 1
    op2 = Sense(op.sens_maps, mask)
    y2 = op2.A(img) + mask * sigma / math.sqrt(2) * torch.view_as_complex(torch.randn(1, COILS, H, W, 2, generator=g))
    br = _optimizer(BlurDenoiser(), op2, y2, st)
    expected = density_weights(mask, detect_acs(mask))
    assert expected is not None and torch.equal(br.heldout_weight, expected)
    x = op2.A_adjoint(y2)
    assert torch.equal(br._loss(x, br.val_lambda), heldout_loss(op2, y2, x, br.val_lambda, expected))
    assert not torch.isclose(br._loss(x, br.val_lambda), heldout_loss(op2, y2, x, br.val_lambda))
    br.calibration.detach()
    none = _optimizer(BlurDenoiser(), op2, y2, dataclasses.replace(st, heldout_weighting="none"))
    assert none.heldout_weight is None
    none.calibration.detach()


def test_progress_bar_names_the_phase_sample_and_level_with_the_time_left(monkeypatch):
    """run(progress=True): one bar over the whole run, labelled 'sample j/K, level k/N', showing the time left,
    its total the run's network evaluations; calibrate's levels as 'calibrating: level k/N'. (No timing asserted.)"""
    import recon.biasrecon as module

    bars = []

    class Recorder:
        def __init__(self, total, disable, bar_format, **kwargs):
            self.total, self.disable, self.format, self.labels, self.n = total, disable, bar_format, [], 0
            bars.append(self)

        def set_description_str(self, label, refresh=True):
            self.labels.append(label)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(module, "tqdm", Recorder)
    op, y, _, _ = _problem()
    settings = BiasReconSettings(**{**SETTINGS, "num_steps": 3, "num_samples": 2, "adapt_fraction": 0.7})
    _optimizer(BlurDenoiser(), op, y, dataclasses.replace(settings, adapt="none")).run(progress=True)
    (bar,) = bars
    assert not bar.disable and "{remaining}" in bar.format
    assert bar.labels == [f"chain: sample {j}/2, level {k}/3" for j in (1, 2) for k in (1, 2, 3)]
    assert bar.n == bar.total == 6
    bars.clear()
    _optimizer(BlurDenoiser(), op, y, dataclasses.replace(settings, adapt="gamma", sure=True)).run(progress=True)
    (bar,) = bars
    assert bar.labels[:3] == [f"calibrating: level {k}/3" for k in (1, 2, 3)]
    assert "guard: sample 2/2, level 3/3" in bar.labels and bar.labels[-1] == "SURE chain: sample 2/2, level 3/3"
    assert bar.n == bar.total  # the estimate of the time left counts every level the run does
    bars.clear()
    _optimizer(BlurDenoiser(), op, y, settings).run()
    assert all(b.disable for b in bars)  # no bar unless asked


def test_samples_are_the_mean_of_single_chains_with_consecutive_seeds():
    """num_samples=K (no calibration, fixed λ) equals the mean of K one-sample runs with seeds seed … seed+K−1:
    what scripts/speed_quality.py relies on to measure 1, 2 and 4 samples from four chains."""
    from recon.speed_quality import mean_of_chains

    op, y, _, _ = _problem()
    base = BiasReconSettings(**{**SETTINGS, "num_steps": 4, "adapt": "none"})
    four = _optimizer(BlurDenoiser(), op, y, dataclasses.replace(base, num_samples=4)).run().image
    chains = [_optimizer(BlurDenoiser(), op, y, dataclasses.replace(base, seed=base.seed + k)).run().image
              for k in range(4)]
    torch.testing.assert_close(mean_of_chains(chains, 4), four, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mean_of_chains(chains, 2), four)


def test_guard_folds_partition_the_validation_pool_and_never_meet_a_calibration_split():
    """guard_splits K = 3: the folds are disjoint, their union is Λ_v, none touches the calibration's split (its Θc
    and Λc) or the data of the calibration's iterate; the guard's score is the mean of the K fold scores, each fold
    scored on a chain run on the data less that fold, and K = 1 is the former single split."""
    op, y, _, _ = _problem()
    st = BiasReconSettings(**{**SETTINGS, "calib_iterate": "theta"}, adapt="gamma", guard_splits=3)
    br = _optimizer(BlurDenoiser(width=0.5), op, y, st)
    folds = br.val_folds
    assert len(folds) == 3 and all(float(f.sum()) > 0 for f in folds)
    torch.testing.assert_close(sum(folds), br.val_lambda, rtol=0, atol=0)
    for i, f in enumerate(folds):
        for g in folds[i + 1:]:
            assert not bool((f * g).any())
        for calib in (br.calib_op.mask, br.calib_lambda):
            assert not bool((f * calib).any())
        assert not bool((br.calib_y * f).any())
    expected = []
    for f in folds:
        keep = op.mask - f
        x0, _ = br.x_step_chain(Sense(op.sens_maps, keep), y * keep, br.lam)
        expected.append(float(heldout_loss(op, y, x0, f, br.heldout_weight)))
    assert br.chain_heldout_loss() == pytest.approx(sum(expected) / 3, rel=1e-6)
    br.calibration.detach()
    one = _optimizer(BlurDenoiser(width=0.5), op, y, BiasReconSettings(**{**SETTINGS, "calib_iterate": "theta"},
                                                                            adapt="gamma"))
    x0, _ = one.x_step_chain(one.val_op, one.val_y, one.lam)
    assert one.chain_heldout_loss() == float(heldout_loss(op, y, x0, one.val_lambda, one.heldout_weight))
    one.calibration.detach()
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="guard_splits"):
            BiasReconSettings(guard_splits=bad)
