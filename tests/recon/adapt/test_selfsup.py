"""Θ/Λ split and held-out loss; fitting γ on the held-out loss improves a miscalibrated denoiser."""

import numpy as np
import pytest
import sigpy.mri
import torch
from torch import nn

from recon.adapt import FrequencyCalibration, acs_mask, density_weights, detect_acs, heldout_loss, split_mask, theta_operator
from recon.dc import prox
from recon.errors import InputError
from recon.masks import center_box, make_mask
from recon.operators import Sense, SingleCoil


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def test_split_of_a_2d_mask():
    mask, _ = make_mask("poisson_2d", (48, 40), 4.0, 0.1, seed=0)
    acs = center_box((48, 40), 0.1)
    split = split_mask(mask, generator=_gen(1), ratio=0.3, acs=0.1)
    theta, lam = split
    assert theta.dtype == lam.dtype == torch.float32
    assert torch.equal(theta + lam, mask)
    assert not bool((theta * lam).any())
    assert torch.equal(theta * acs * mask, acs * mask)  # ACS stays in Θ
    assert acs.sum() > 0 and (acs * mask).sum() == acs.sum()
    free = int((mask * (1 - acs)).sum())
    assert int(lam.sum()) == round(0.3 * free)
    # seeded: same seed same split, other seed or next draw another split
    assert torch.equal(split_mask(mask, generator=_gen(1), ratio=0.3, acs=0.1).lam, lam)
    assert not torch.equal(split_mask(mask, generator=_gen(2), ratio=0.3, acs=0.1).lam, lam)
    g = _gen(1)
    first, second = split_mask(mask, generator=g, ratio=0.3, acs=0.1), split_mask(mask, generator=g, ratio=0.3, acs=0.1)
    assert torch.equal(first.lam, lam) and not torch.equal(second.lam, lam)


def test_split_of_a_column_mask_moves_whole_columns():
    mask, _ = make_mask("random_1d", (32, 64), 4.0, 0.08, seed=3)
    theta, lam = split_mask(mask, generator=_gen(4), ratio=0.5, acs=0.08)
    for part in (theta, lam):
        assert torch.equal(part, part[:1].expand_as(part))  # row-constant
    assert torch.equal(theta + lam, mask)
    acs_cols = slice((64 - 5 + 1) // 2, (64 - 5 + 1) // 2 + 5)  # round(64 * 0.08) = 5 central columns
    assert bool((theta[:, acs_cols] == 1).all())
    free_cols = int(mask[0].sum()) - 5
    assert int(lam[0].sum()) == round(0.5 * free_cols)
    # forcing an entry-wise split of the same mask breaks the row structure
    theta2, lam2 = split_mask(mask, generator=_gen(4), ratio=0.5, acs=0.08, columns=False)
    assert not torch.equal(lam2, lam2[:1].expand_as(lam2))
    assert torch.equal(theta2 + lam2, mask)


def test_split_accepts_an_acs_mask_and_bool_input():
    mask = (torch.rand(20, 20, generator=_gen(5)) < 0.5)
    acs = torch.zeros(20, 20)
    acs[8:12, 5:15] = 1
    theta, lam = split_mask(mask, generator=_gen(6), ratio=0.5, acs=acs)
    assert torch.equal(theta + lam, mask.float())
    assert torch.equal(theta * acs, mask.float() * acs)
    assert int(lam.sum()) == round(0.5 * int((mask.float() * (1 - acs)).sum()))


def test_detect_acs_finds_the_fully_sampled_centre():
    mask, _ = make_mask("random_1d", (32, 64), 4.0, 0.125, seed=0)
    acs = detect_acs(mask)
    cols = torch.nonzero(acs[0]).flatten().tolist()
    assert cols == list(range(cols[0], cols[-1] + 1)) and 32 in cols and len(cols) >= 8  # 0.125 · 64 = 8 lines
    assert bool((mask[:, cols] == 1).all()) and not bool(mask[0, cols[0] - 1]) and not bool(mask[0, cols[-1] + 1])
    assert torch.equal(acs, acs[:1].expand_as(acs))
    box = detect_acs(make_mask("poisson_2d", (48, 40), 4.0, 0.1, seed=0)[0])
    assert bool((box <= make_mask("poisson_2d", (48, 40), 4.0, 0.1, seed=0)[0]).all())
    assert bool((box >= center_box((48, 40), 0.1)).all())
    assert int(detect_acs(torch.zeros(8, 8)).sum()) == 0
    # held out entries then all lie outside the centre
    split = split_mask(mask, generator=_gen(2), ratio=0.5, acs=acs)
    assert not bool((split.lam * acs).any())
    with pytest.raises(InputError, match="detect_acs"):
        detect_acs(torch.zeros(2, 8, 8))


def test_split_rejects_bad_input():
    mask, _ = make_mask("gaussian_2d", (16, 16), 3.0, 0.1, seed=0)
    with pytest.raises(InputError, match="ratio"):
        split_mask(mask, generator=_gen(0), ratio=1.0)
    with pytest.raises(InputError, match="ratio"):
        split_mask(mask, generator=_gen(0), ratio=0.0)
    with pytest.raises(InputError, match=r"\(H, W\)"):
        split_mask(mask[None], generator=_gen(0))
    with pytest.raises(InputError, match="columns=True"):
        split_mask(mask, generator=_gen(0), columns=True)
    with pytest.raises(InputError, match="generator"):
        split_mask(mask, generator=0)
    with pytest.raises(InputError, match="outside the ACS"):
        split_mask(center_box((16, 16), 0.25), generator=_gen(0), acs=0.25)


# --------------------------------------------------------------------------------------------
# held-out loss
# --------------------------------------------------------------------------------------------


def _sense_problem(batch=2, coils=4, h=24, w=20, dtype=torch.complex128):
    maps = torch.from_numpy(sigpy.mri.birdcage_maps((coils, h, w))).to(dtype)[None].expand(batch, -1, -1, -1)
    mask, _ = make_mask("gaussian_2d", (h, w), 3.0, 0.15, seed=7)
    op = Sense(maps.contiguous(), mask.double() if dtype == torch.complex128 else mask)
    x_true = torch.randn(batch, 1, h, w, dtype=dtype, generator=_gen(8))
    return op, mask, x_true, op.A(x_true)


def test_heldout_loss_vanishes_at_the_truth_and_is_scale_invariant():
    op, mask, x_true, y = _sense_problem()
    lam = split_mask(mask, generator=_gen(9)).lam.double()
    assert heldout_loss(op, y, x_true, lam).item() < 1e-24
    x = x_true + 0.1 * torch.randn(x_true.shape, dtype=x_true.dtype, generator=_gen(10))
    loss = heldout_loss(op, y, x, lam)
    assert loss.item() > 1e-3
    assert torch.allclose(heldout_loss(op, 37.5 * y, 37.5 * x, lam), loss, rtol=1e-12, atol=0)
    # the explicit formula, item by item (numpy)
    kx, yy, ll = op.A(x).numpy(), y.numpy(), lam.numpy()
    per_item = [np.sum(np.abs(ll * (kx[i] - yy[i])) ** 2) / np.sum(np.abs(ll * yy[i]) ** 2) for i in range(2)]
    assert np.isclose(loss.item(), np.mean(per_item), rtol=1e-12)


def test_heldout_loss_gradient_is_the_adjoint_residual():
    op, mask, x_true, y = _sense_problem()
    lam = split_mask(mask, generator=_gen(11)).lam.double()
    x = (x_true + 0.2 * torch.randn(x_true.shape, dtype=x_true.dtype, generator=_gen(12))).requires_grad_(True)
    heldout_loss(op, y, x, lam).backward()
    # ∂L/∂Re x + i ∂L/∂Im x = 2 Aᴴ Λ (A x − y) / (B ‖Λ y_i‖²)
    energy = (lam * y).abs().square().sum(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    expected = 2 * op.A_adjoint(lam * (op.A(x.detach()) - y)) / (2 * energy)
    assert torch.allclose(x.grad, expected, rtol=1e-10, atol=1e-14)


def test_weighted_heldout_loss_is_the_weighted_formula_and_ones_change_nothing():
    op, mask, x_true, y = _sense_problem()
    lam = split_mask(mask, generator=_gen(9)).lam.double()
    x = x_true + 0.1 * torch.randn(x_true.shape, dtype=x_true.dtype, generator=_gen(10))
    assert torch.equal(heldout_loss(op, y, x, lam, torch.ones_like(lam)), heldout_loss(op, y, x, lam))
    w = torch.rand(lam.shape, generator=_gen(13), dtype=torch.float64) + 0.5
    kx, yy, ll, ww = op.A(x).numpy(), y.numpy(), lam.numpy(), w.numpy()
    per_item = [np.sum(ww * np.abs(ll * (kx[i] - yy[i])) ** 2) / np.sum(ww * np.abs(ll * yy[i]) ** 2) for i in range(2)]
    assert np.isclose(heldout_loss(op, y, x, lam, w).item(), np.mean(per_item), rtol=1e-12)


def _radial_random_mask(shape, seed):
    """Each entry sampled independently with a known density p(u) = 0.6 (1 − u)² + 0.04 inside u < 1
    (u the elliptic radius), the 10 % centre box always: a variable-density 2-D mask with known p."""
    h, w = shape
    ky = (torch.arange(h, dtype=torch.float64) - h // 2).abs() / (h / 2)
    kx = (torch.arange(w, dtype=torch.float64) - w // 2).abs() / (w / 2)
    u = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    p = torch.where(u < 1, 0.6 * (1 - u).clamp(min=0) ** 2 + 0.04, torch.zeros((), dtype=torch.float64))
    mask = (torch.rand(shape, generator=_gen(seed), dtype=torch.float64) < p).float()
    centre = center_box(shape, 0.1)
    return torch.maximum(mask, centre), centre, p, u


def test_density_weights_are_the_inverse_sampling_density():
    mask, centre, p, u = _radial_random_mask((200, 160), seed=21)
    w = density_weights(mask, centre)
    assert torch.equal(w, density_weights(mask, 0.1))  # a fraction: the same central box
    taken = (mask != 0) & (centre == 0)
    assert w.shape == mask.shape and bool((w[~taken] == 0).all()) and bool((w[taken] > 0).all())
    assert torch.isclose(w[taken].mean(), torch.tensor(1.0))
    # w ∝ 1/p: w·p is the same constant everywhere the mask reaches (binned estimate: within 25 %)
    wp = (w.double() * p)[taken]
    assert float(wp.max() / wp.min()) < 1.25 ** 2 and float(p[taken].max() / p[taken].min()) > 10
    # so the weighted mean over the sampled entries estimates the mean over the whole reachable non-ACS
    # k-space (the held-out loss's aim), where the plain mean over-weights the densely sampled centre
    energy = 1.0 / (0.02 + u) ** 2  # a k-space error energy falling off with |k|
    reach = (centre == 0) & (u <= float(u[taken].max()))
    truth = float(energy[reach].mean())
    weighted = float((w.double() * energy)[taken].sum() / w.double()[taken].sum())
    plain = float(energy[taken].mean())
    assert abs(weighted / truth - 1) < 0.1 and plain / truth > 2


def test_density_weights_leave_sparse_1d_masks_unweighted():
    torch.manual_seed(0)
    mask, _ = make_mask("random_1d", (320, 256), 4.0, 0.08, seed=3)  # 64 sampled columns, 20 in the centre
    assert density_weights(mask, detect_acs(mask)) is None and density_weights(mask, 0.08) is None
    with pytest.raises(InputError, match="density_weights"):
        density_weights(mask, detect_acs(mask)[:10])
    with pytest.raises(InputError, match="density_weights"):
        density_weights(mask[None], 0.08)


def test_heldout_loss_rejects_empty_heldout_energy_and_bad_shapes():
    op, mask, x_true, y = _sense_problem()
    with pytest.raises(InputError, match="no energy"):
        heldout_loss(op, y, x_true, (1 - mask).double())
    with pytest.raises(InputError, match="k-space shape"):
        heldout_loss(op, y[:, :2], x_true, mask)


def test_theta_operator_keeps_maps_and_uses_theta():
    op, mask, x_true, y = _sense_problem()
    theta = split_mask(mask, generator=_gen(13)).theta.double()
    op_theta = theta_operator(op, theta)
    assert isinstance(op_theta, Sense) and torch.equal(op_theta.mask, theta)
    assert torch.equal(op_theta.sens_maps, op.sens_maps) and torch.equal(op.mask, mask.double())
    assert torch.allclose(op_theta.A(x_true), theta * y, atol=1e-12)
    single = SingleCoil(mask, (1, 1, 24, 20))
    assert isinstance(theta_operator(single, mask), SingleCoil)


# --------------------------------------------------------------------------------------------
# measured gain: a miscalibrated (over-smoothing) denoiser, γ fitted on the held-out loss
# --------------------------------------------------------------------------------------------


def _phantom(h, w):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    img = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float() * 0.6
    img += ((xx - 0.2) ** 2 / 0.1 + (yy + 0.1) ** 2 / 0.2 < 1).float() * 0.4
    img += ((xx + 0.35) ** 2 + (yy - 0.3) ** 2 < 0.02).float() * 0.5
    img += ((xx.abs() < 0.3) & (yy.abs() < 0.03)).float() * 0.3
    return (img * torch.exp(0.5j * xx)).to(torch.complex64)[None, None]


class _BlurringDenoiser(nn.Module):
    """A 'pre-trained' denoiser from a site with lower resolution: Gaussian blur, mixing conv, output conv."""

    def __init__(self, std=1.5, size=7):
        super().__init__()
        self.blur = nn.Conv2d(2, 2, size, padding=size // 2, padding_mode="circular", groups=2, bias=False)
        self.mix = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", bias=False)
        self.out = nn.Conv2d(2, 2, 1, bias=False)
        t = torch.arange(size) - size // 2
        g = torch.exp(-(t**2) / (2 * std**2))
        kernel = torch.outer(g, g) / torch.outer(g, g).sum()
        with torch.no_grad():
            self.blur.weight.copy_(kernel.expand(2, 1, size, size))
            self.mix.weight.zero_()
            self.mix.weight[0, 0, 1, 1] = self.mix.weight[1, 1, 1, 1] = 1
            self.out.weight.copy_(torch.eye(2)[:, :, None, None])

    def forward(self, x):
        return self.out(self.mix(self.blur(x)))

    def denoise(self, x):
        o = self(torch.cat([x.real, x.imag], dim=1))
        return torch.complex(o[:, :1], o[:, 1:])


def test_fitting_gamma_on_the_heldout_loss_lowers_heldout_and_true_error():
    h = w = 64
    x_true = _phantom(h, w)
    mask, _ = make_mask("gaussian_2d", (h, w), 4.0, 0.08, seed=3)
    op = SingleCoil(mask, (1, 1, h, w))
    y = op.A(x_true)
    g = _gen(1)
    noisy = x_true + 0.05 * torch.complex(torch.randn(1, 1, h, w, generator=g), torch.randn(1, 1, h, w, generator=g))
    net = _BlurringDenoiser().eval().requires_grad_(False)
    calib = FrequencyCalibration(net).attach()
    assert calib.layer_names == ("blur", "mix")
    weight = 1e-3  # DC weight λ of the prox

    def scores(seed=100, draws=8):
        """Mean held-out loss over fixed splits, and the relative error of the full-data estimate."""
        gen, losses = _gen(seed), []
        with torch.no_grad():
            estimate = net.denoise(noisy)
            for _ in range(draws):
                theta, lam = split_mask(mask, generator=gen)
                losses.append(heldout_loss(op, y, prox(theta_operator(op, theta), y, estimate, weight), lam).item())
            x_hat = prox(op, y, estimate, weight)
        return np.mean(losses), (torch.linalg.vector_norm(x_hat - x_true) / torch.linalg.vector_norm(x_true)).item()

    loss0, err0 = scores()
    optimizer = torch.optim.Adam(calib.parameters(), lr=0.1)
    gen = _gen(5)
    for _ in range(40):
        theta, lam = split_mask(mask, generator=gen)  # a fresh split each step
        loss = heldout_loss(op, y, prox(theta_operator(op, theta), y, net.denoise(noisy), weight), lam)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss1, err1 = scores()
    assert loss1 < 0.75 * loss0
    assert err1 < 0.9 * err0
    assert all(p.grad is None for p in net.parameters())
    calib.detach()
    assert np.isclose(scores()[0], loss0)


def _one_per_stratum(radius: torch.Tensor, units: torch.Tensor, held: torch.Tensor) -> bool:
    """Whether ``held`` takes one unit from each stratum, by hand: the sampled free units' distances sorted and cut
    into ``m = |held|`` consecutive groups (floor(j n / m) boundaries); the j-th nearest held-out unit must lie in
    group j's distance range (ranges, not unit sets: equal distances may fall either side of a boundary)."""
    r = torch.sort(radius[units]).values
    h = torch.sort(radius[held]).values
    n, m = r.numel(), h.numel()
    return all(r[j * n // m] <= h[j] <= r[(j + 1) * n // m - 1] for j in range(m))


@pytest.mark.parametrize("kind", ["random_1d", "poisson_2d"])
def test_stratified_split_holds_out_one_unit_per_distance_stratum(kind):
    """Stratified Λ: a partition of Ω like the plain draw, with the same count, and exactly one held-out unit (column
    or entry) in each stratum of the distance from the k-space centre; so the held-out unit nearest the centre is
    always among the nearest n/m sampled units, which a plain draw of a few columns misses for some seeds."""
    shape = (40, 96)
    mask, _ = make_mask(kind, shape, 4.0, 0.08, seed=2)
    columns = kind == "random_1d"
    acs = 0.08
    acs_region = (acs_mask(shape, acs, columns) != 0)
    kx = (torch.arange(96, dtype=torch.float64) - 48).abs() / 48
    ky = (torch.arange(40, dtype=torch.float64) - 20).abs() / 20
    if columns:
        radius, units = kx, (mask[0] != 0) & ~acs_region.any(0)
    else:
        radius, units = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).flatten(), ((mask != 0) & ~acs_region).flatten()
    missed = 0
    for seed in range(20):
        theta, lam = split_mask(mask, generator=_gen(seed), ratio=0.4, acs=acs, stratified=True)
        plain = split_mask(mask, generator=_gen(seed), ratio=0.4, acs=acs)
        assert torch.equal(theta + lam, mask) and not bool((theta * lam).any())
        held = (lam[0] if columns else lam.flatten()) != 0
        count = int(held.sum())
        assert count == int(((plain.lam[0] if columns else plain.lam.flatten()) != 0).sum())
        assert _one_per_stratum(radius, units, held)
        plain_held = (plain.lam[0] if columns else plain.lam.flatten()) != 0
        nearest = torch.sort(radius[units]).values[units.sum() // count - 1]
        assert radius[held].min() <= nearest
        missed += bool(radius[plain_held].min() > nearest)
    if columns:  # the plain draw of 7 of 18 columns leaves the nearest stratum empty for some seeds
        assert missed > 0
    # seeded and random within the strata
    again = split_mask(mask, generator=_gen(3), ratio=0.4, acs=acs, stratified=True).lam
    assert torch.equal(again, split_mask(mask, generator=_gen(3), ratio=0.4, acs=acs, stratified=True).lam)
    assert not torch.equal(again, split_mask(mask, generator=_gen(4), ratio=0.4, acs=acs, stratified=True).lam)


def test_split_folds_deal_the_heldout_set_into_disjoint_folds():
    """Columns stay whole for a row-constant Λ, entries otherwise; the folds sum to Λ, are disjoint, differ in size by
    at most one unit, and the same generator state gives the same folds."""
    from recon.adapt.selfsup import split_folds

    cols = torch.zeros(10, 16)
    cols[:, [1, 3, 4, 8, 11, 12, 14]] = 1
    entries = (torch.rand(10, 16, generator=_gen(1)) < 0.3).float()
    for lam, columns in ((cols, True), (entries, False)):
        folds = split_folds(lam, 3, generator=_gen(5))
        torch.testing.assert_close(sum(folds), lam, rtol=0, atol=0)
        sizes = []
        for i, f in enumerate(folds):
            for g in folds[i + 1:]:
                assert not bool((f * g).any())
            if columns:
                assert torch.equal(f, f[:1].expand_as(f))
            sizes.append(int(f[0].sum()) if columns else int(f.sum()))
        assert max(sizes) - min(sizes) <= 1
        again = split_folds(lam, 3, generator=_gen(5))
        assert all(torch.equal(a, b) for a, b in zip(folds, again))
    with pytest.raises(InputError, match="folds"):
        split_folds(cols, 8, generator=_gen(0))
    with pytest.raises(InputError, match="folds"):
        split_folds(cols, 0, generator=_gen(0))
