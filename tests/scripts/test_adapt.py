"""scripts/adapt.py end to end on a tiny simulated site: fastMRI-format outputs scored by
fastmri.evaluate, metrics.json equal to recomputed numbers, site profiles saved and reused (and
actually applied), single-coil prospectively undersampled input without target, and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fastmri import evaluate as fm_eval

from recon.adapt import CalibratedPrior, CalibrationShape, load_profile, save_profile
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.coils import sensitivity_maps
from recon.config import DEFAULT_CONFIG, PRESETS, load_config, method_settings, split_overrides
from recon.data import FastMRISliceDataset
from recon.fft import fft2c, ifft2c
from recon.operators import Sense
from recon.runner import noise_level, plan_batches
from recon.sure import estimate_sigma
from scores.priors import load_prior, resolve_prior
from scores.samplers import TweedieSampler
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "adapt.py"
# 32 x 32, 4 coils, 2 volumes of 2 slices; ACS of 8 columns for ESPIRiT
SITE = ["site.acquisition.matrix=[32,32]", "site.data.num_subjects=2", "site.data.slices_per_subject=2",
        "site.coils.count=4", "site.acquisition.center_fraction=0.25", "site.acquisition.acceleration=3"]
FAST = ["biasrecon.num_steps=2", "biasrecon.lam_grid=[0.01,0.1]"]
MASK = dict(mask_type="random_1d", acceleration=3.0, center_fraction=0.25)  # unseen_center_template's, as overridden


adapt = load_script("scripts/adapt.py")
PRIOR_FILE = resolve_prior("source_brain")


def _data_files(out: Path) -> list[Path]:
    (folder,) = (out / "data").iterdir()
    return sorted(folder.glob("*.h5"))


def _read(path: Path, key: str = "reconstruction") -> np.ndarray:
    with h5py.File(path, "r") as hf:
        return hf[key][()]


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory):
    """Mode scan, default methods, 3 slices: a full volume and a volume cut to one slice (2 batches)."""
    out = tmp_path_factory.mktemp("scan") / "out"
    assert adapt.main(["--site", "unseen_center_template", "--out", str(out), "--max-slices", "3", *SITE, *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def site_run(tmp_path_factory):
    """Mode site on 2 slices, saving a new profile with --profile."""
    base = tmp_path_factory.mktemp("site")
    out, profile = base / "out", base / "unseen.json"
    argv = ["--site", "unseen_center_template", "--out", str(out), "--max-slices", "2", "--profile", str(profile),
            "mode=site", "calib_slices=2", *SITE, *FAST]
    assert adapt.main(argv) == 0
    return out, profile


@pytest.fixture(scope="module")
def prior():
    return load_prior("source_brain").model


def test_outputs_are_fastmri_submissions_and_metrics_match_fastmri_evaluate(scan_run):
    files = _data_files(scan_run)
    assert len(files) == 2
    metrics = json.loads((scan_run / "metrics.json").read_text())
    assert sorted(metrics) == ["biasrecon", "unadapted"]
    targets = [_read(files[0], "reconstruction_rss"), _read(files[1], "reconstruction_rss")[:1]]
    cleans = [_read(files[0], "reconstruction_clean"), _read(files[1], "reconstruction_clean")[:1]]
    for method, entry in metrics.items():
        scores = {"psnr": [], "ssim": [], "nmse": [], "psnr_clean": [], "ssim_clean": [], "nmse_clean": []}
        for path, target, clean in zip(files, targets, cleans):
            with h5py.File(scan_run / "reconstructions" / method / path.name, "r") as hf:
                assert list(hf.keys()) == ["reconstruction"]
                recon = hf["reconstruction"][()]
            assert recon.dtype == np.float32 and recon.shape == target.shape  # the first three slices
            for suffix, ref in (("", target), ("_clean", np.abs(clean))):
                scores["psnr" + suffix].append(fm_eval.psnr(ref, recon))
                scores["ssim" + suffix].append(fm_eval.ssim(ref, recon))
                scores["nmse" + suffix].append(fm_eval.nmse(ref, recon))
        for key, values in scores.items():
            assert entry[key] == pytest.approx(float(np.mean(values)), rel=1e-6), (method, key)
        assert entry["psnr"] > 15 and entry["seconds_per_slice"] > 0  # the anatomy, not noise
        assert entry["psnr_clean"] != entry["psnr"]  # a different reference (the target carries the noise)
    assert metrics["unadapted"]["lam"] == pytest.approx(0.1)  # fixed λ of the config
    # mean over batches of SURE's λ: on the grid [0.01, 0.1], or up to 4 steps of its ratio past an edge minimum
    assert 0.01 / 10**4 - 1e-12 <= metrics["biasrecon"]["lam"] <= 0.1 * 10**4
    assert metrics["biasrecon"]["val_loss_best"] <= metrics["biasrecon"]["val_loss_zero"]  # the library's guard
    assert metrics["biasrecon"]["noise_sigma"] > 0  # estimated from k-space (checked below on known noise)
    # χ² of the SENSE fit against the corner σ (SURE's σ is the regression σ): reported with SURE only
    assert 0 < metrics["biasrecon"]["misfit"] < 1e3 and "misfit" not in metrics["unadapted"]


def test_figures_profile_and_config_are_written(scan_run):
    for name in ("comparison.png", "trajectories.png", "gamma.png"):
        assert (scan_run / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    profile = load_profile(scan_run / "profile.json")
    digest = hashlib.sha256(PRIOR_FILE.read_bytes()).hexdigest()
    assert profile.prior == digest and profile.site == "unseen_center_template"
    assert profile.family == BiasReconSettings().calibration_family and profile.gamma.numel() < 100
    assert profile.extra["mode"] == "scan" and len(profile.extra["calibrated_on"]) == 2  # the first batch
    files = _data_files(scan_run)
    for path in files:  # each volume's first batch's γ, a site profile of its own (γ is not in the records)
        assert load_profile(scan_run / "profiles" / f"{path.name}.json").prior == digest
        assert "gamma" not in (scan_run / "records" / f"{path.name}.json").read_text()
    first = load_profile(scan_run / "profiles" / f"{files[0].name}.json")
    assert torch.equal(first.gamma, profile.gamma)  # profile.json is the first volume's, read back validated
    assert "biasrecon:" in (scan_run / "config.yaml").read_text()
    assert not list(scan_run.rglob(".*tmp*"))  # no temp files left


def test_written_reconstruction_is_the_library_result(site_run, prior, tmp_path):
    """A profile with non-zero γ is applied: the written volume equals BiasRecon run directly with it."""
    out, profile_path = site_run
    original = load_profile(profile_path)
    defaults = BiasReconSettings()
    calibration = CalibrationShape(defaults.calibration_family, below=defaults.calibrate_below).build(prior)  # the default
    gamma = 0.1 * torch.randn(calibration.gamma.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calibration.gamma.copy_(gamma)
    crafted = save_profile(tmp_path / "crafted.json", calibration, original.site, original.prior)
    reuse = tmp_path / "reuse"
    data = _data_files(out)[0]
    argv = ["--site", "unseen_center_template", "--data", str(data), "--out", str(reuse), "--profile", str(crafted),
            "methods=[biasrecon]", *SITE, *FAST]
    assert adapt.main(argv) == 0
    assert torch.equal(load_profile(reuse / "profile.json").gamma, gamma)  # the reused γ, exactly

    config = load_config(DEFAULT_CONFIG, FAST)
    dataset = FastMRISliceDataset(data, **MASK)
    samples = [dataset[i] for i in range(2)]
    kspace = torch.stack([s.kspace for s in samples])
    mask = torch.stack([s.mask for s in samples])[:, None]
    op = Sense(torch.stack([sensitivity_maps(s) for s in samples]), mask)
    settings = dataclasses.replace(method_settings(config, "biasrecon"), adapt="none",
                                   noise_sigma=noise_level(kspace, mask))
    calibrated = CalibratedPrior(prior, gamma, CalibrationShape(settings.calibration_family,  # the profile's γ, as a value
                                                                below=settings.calibrate_below))
    image = BiasRecon(calibrated, op, kspace, settings, sampler=TweedieSampler()).run().image
    expected = np.stack([s.denormalize(im.abs()[0]).numpy() for s, im in zip(samples, image)])
    written = _read(reuse / "reconstructions" / "biasrecon" / data.name)
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-4 * float(expected.max()))
    calibrated = _read(out / "reconstructions" / "biasrecon" / data.name)
    assert np.abs(written - calibrated).max() > 1e-3 * float(expected.max())  # γ changed the result


def test_profile_round_trip_gives_the_same_gamma_and_reconstruction(site_run, tmp_path):
    out, profile_path = site_run
    saved, local = load_profile(profile_path), load_profile(out / "profile.json")
    assert torch.equal(saved.gamma, local.gamma)
    assert saved.extra["mode"] == "site" and len(saved.extra["calibrated_on"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["biasrecon"]["val_loss_best"] <= metrics["biasrecon"]["val_loss_zero"]
    before = profile_path.read_bytes()
    again = tmp_path / "again"
    argv = ["--site", "unseen_center_template", "--out", str(again), "--max-slices", "2", "--profile", str(profile_path),
            "methods=[biasrecon]", *SITE, *FAST]
    assert adapt.main(argv) == 0
    assert profile_path.read_bytes() == before  # reused, not rewritten
    assert torch.equal(load_profile(again / "profile.json").gamma, saved.gamma)
    name = _data_files(out)[0].name
    np.testing.assert_allclose(_read(again / "reconstructions" / "biasrecon" / name),
                               _read(out / "reconstructions" / "biasrecon" / name), rtol=1e-5, atol=1e-6)


def test_single_coil_prospective_file_without_target(scan_run, tmp_path, capsys):
    """Single-coil, undersampled k-space on its own raw scale, no target: output at the k-space matrix."""
    source = _data_files(scan_run)[0]
    coil0 = _read(source, "kspace")[:, 0]  # (slices, H, W)
    columns = np.zeros(coil0.shape[-1], dtype=bool)
    columns[::2] = True
    columns[12:20] = True
    kspace = (coil0 * columns * 1e3).astype(np.complex64)  # another raw scale
    data = tmp_path / "data"
    data.mkdir()
    with h5py.File(data / "single.h5", "w") as hf:
        hf.create_dataset("kspace", data=kspace)
    out = tmp_path / "out"
    assert adapt.main(["--site", "unseen_center_template", "--data", str(data), "--out", str(out),
                       "methods=[unadapted]", "preset=fast", *FAST]) == 0
    assert "preset fast: 2 noise levels, 1 posterior sample " in capsys.readouterr().out  # the summary says what ran
    written = _read(out / "reconstructions" / "unadapted" / "single.h5")
    assert written.shape == kspace.shape and np.isfinite(written).all()
    zero_filled = np.abs(ifft2c(torch.from_numpy(kspace)).numpy())
    ratio = np.linalg.norm(written) / np.linalg.norm(zero_filled)
    assert 0.8 < ratio < 2.5  # the file's raw scale (the normalisation scale is undone)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "psnr" not in metrics["unadapted"] and metrics["unadapted"]["seconds_per_slice"] > 0
    assert not (out / "profile.json").exists()  # no method calibrates γ


def test_noise_level_uses_the_readout_periphery_when_no_outer_column_is_sampled():
    gen = torch.Generator().manual_seed(0)
    noise = torch.view_as_complex(torch.randn(2, 4, 64, 64, 2, generator=gen)) * (0.05 / 2**0.5)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 24:40] = 1  # only central columns: no outer phase-encoding lines
    kspace = noise * mask
    assert noise_level(kspace, mask) == estimate_sigma(kspace, mask) == pytest.approx(0.05, rel=0.05)
    r2 = (torch.arange(64) - 32.0)[:, None] ** 2 + (torch.arange(64) - 32.0)[None, :] ** 2
    blob = (20 * torch.exp(-r2 / (2 * 6.0**2))).to(torch.complex64)[None, None]
    clean = fft2c(blob).expand(2, 4, 64, 64) * mask
    assert float(clean.abs().max()) > 100 * 0.05  # the object dominates the sampled centre
    assert noise_level(clean + kspace, mask) == pytest.approx(0.05, rel=0.1)  # a smooth object barely biases it


def test_plan_batches_groups_consecutive_slices_of_one_volume():
    index = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    assert plan_batches(index, 6, 2) == [[0, 1], [2], [3, 4], [5]]
    assert plan_batches(index, 4, 8) == [[0, 1, 2], [3]]


def test_overrides_reach_the_typed_settings():
    config = load_config(DEFAULT_CONFIG, ["biasrecon.num_steps=7", "biasrecon.lam_grid=[0.5,2]",
                                                      "biasrecon.noise_sigma=0.02"])
    nosure = method_settings(config, "biasrecon_nosure")
    assert (nosure.num_steps, nosure.lam_grid, nosure.noise_sigma, nosure.sure, nosure.adapt) == \
        (7, (0.5, 2.0), 0.02, False, "gamma")
    assert method_settings(config, "finetune").adapt == "full"
    assert (method_settings(config, "unadapted").adapt, method_settings(config, "unadapted").sure) == \
        ("none", False)
    assert split_overrides(["mode=site", "site.noise.sigma=0.1"]) == (["mode=site"], ["noise.sigma=0.1"])
    assert load_config(DEFAULT_CONFIG, ["maps=true"]).maps == "true"  # YAML reads `true` as a boolean


def _leaves(config) -> dict:
    flat = {}
    for key, value in dataclasses.asdict(config).items():
        for sub, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            flat[f"{key}.{sub}" if sub else key] = v
    return flat


def test_preset_fast_changes_exactly_its_documented_keys():
    """preset=fast sets the keys of recon.config.PRESETS['fast'] (8 levels, 1 sample) and nothing else; the
    default preset is the shipped quality one (the YAML's values)."""
    quality, fast = _leaves(load_config(DEFAULT_CONFIG)), _leaves(load_config(DEFAULT_CONFIG, ["preset=fast"]))
    assert quality["preset"] == "quality"
    changed = {k: v for k, v in fast.items() if quality[k] != v}
    expected = {f"biasrecon.{k}": v for k, v in PRESETS["fast"]["biasrecon"].items()}
    assert changed == {"preset": "fast", **{k: v for k, v in expected.items() if quality[k] != v}}
    assert expected == {"biasrecon.num_steps": 8, "biasrecon.num_samples": 1}
    assert {k: fast[k] for k in expected} == expected


@pytest.mark.parametrize("order", ["preset first", "preset last"])
def test_keys_on_the_command_line_override_the_preset(order):
    items = ["preset=fast", "biasrecon.num_steps=12"]
    config = load_config(DEFAULT_CONFIG, items if order == "preset first" else items[::-1])
    assert (config.preset, config.biasrecon.num_steps, config.biasrecon.num_samples) == ("fast", 12, 1)


def test_preset_in_a_yaml_file(tmp_path):
    path = tmp_path / "cpu.yaml"
    path.write_text("preset: fast\nbiasrecon:\n  lam: 0.03\n")
    config = load_config(path)
    assert (config.biasrecon.num_steps, config.biasrecon.num_samples, config.biasrecon.lam) == (8, 1, 0.03)
    assert load_config(path, ["preset=quality"]).biasrecon.num_steps == BiasReconSettings().num_steps


# --------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------


def _assert_bad_input(capsys, out: Path, argv: list[str], fragment: str) -> None:
    assert adapt.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["biasrecon.nope=1"], "biasrecon.nope"),
        (["biasrecon.num_steps=many"], "biasrecon.num_steps"),
        (["site.acquisition.nope=1"], "acquisition.nope"),
        (["mode=sometimes"], "'mode'"),
        (["preset=turbo"], "key 'preset' is 'turbo', expected one of quality, fast"),
        (["maps=false"], "'maps'"),
        (["maps_block=circle"], "key 'maps_block' is 'circle', expected one of square, rectangle"),
        (["methods=[biasrecon,magic]"], "'methods'"),
        (["no_equals_sign"], "key=value"),
        (["biasrecon.calibration_family=bands", "calibration.bands=6"], "variables"),  # 18 blocks x 6 bands > 99
        (["calibration.bands=4"], "shape only the bands family"),  # the default family (norm_affine) has no bands
    ],
)
def test_bad_overrides(tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--out", str(out), *extra], fragment)


def test_unknown_site_from_the_command_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--site", "nowhere", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], proc.stderr
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--data", str(tmp_path / "absent"), "--out", str(out)],
                      "absent")


def test_corrupt_h5(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--data", str(data), "--out", str(out)], "broken.h5")


def test_out_inside_data(scan_run, tmp_path, capsys):
    data = _data_files(scan_run)[0].parent
    before = sorted(p.name for p in data.iterdir())
    out = data / "results"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--data", str(data), "--out", str(out)], "--out")
    assert sorted(p.name for p in data.iterdir()) == before


def test_pickle_prior(tmp_path, capsys):
    prior = tmp_path / "prior.pt"
    torch.save({"weight": torch.zeros(2)}, prior)
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--prior", str(prior), "--out", str(out)], "pickle")


def test_profile_of_another_prior(site_run, tmp_path, capsys):
    original = load_profile(site_run[1])
    record = json.loads(site_run[1].read_text())
    record["prior"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(record))
    assert original.prior != record["prior"]
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--profile", str(other), "--out", str(out)], "'prior'")


@pytest.mark.parametrize("value", ["no_such_prior", "missing/prior.safetensors"])
def test_unknown_prior_name_or_missing_file(tmp_path, capsys, value):
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", "unseen_center_template", "--prior", value, "--out", str(out)],
                      f"key '--prior' is '{value}'")


def test_help_lists_the_bundled_priors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        adapt.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = sorted(p.stem for p in PRIOR_FILE.parent.glob("*.safetensors"))  # the package's weights folder
    assert names and f"a bundled prior ({', '.join(names)})" in text


def test_misfit_gate_leaves_the_prior_unadapted_and_says_so(tmp_path, capsys):
    """A limit below the data's χ²: BiasRecon skips its calibration on every slice, says so, and its images are
    those of the unadapted prior with SURE (the same λ-step on the same chain)."""
    out = tmp_path / "out"
    argv = ["--site", "unseen_center_template", "--out", str(out), "--max-slices", "2", *SITE, *FAST,
            "biasrecon.misfit_limit=0.01", "methods=[biasrecon,unadapted_sure]"]
    assert adapt.main(argv) == 0
    printed = capsys.readouterr().out
    assert "biasrecon: not calibrated on 2 slices" in printed and "misfit_limit = 0.01" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["biasrecon"]["calibration_skipped_slices"] == 2 and metrics["biasrecon"]["misfit"] > 0.01
    written = sorted((out / "reconstructions" / "biasrecon").glob("*.h5"))
    assert written
    for path in written:
        np.testing.assert_array_equal(_read(path), _read(out / "reconstructions" / "unadapted_sure" / path.name))


def _site_yaml(tmp_path: Path, prior: str | None) -> Path:
    """unseen_center's YAML with its ``prior`` key replaced (or removed for ``None``)."""
    lines = [line for line in (ROOT / "configs" / "sites" / "unseen_center.yaml").read_text().splitlines()
             if not line.startswith("prior:")]
    if prior is not None:
        lines.insert(0, f"prior: {prior}")
    path = tmp_path / "my_site.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_site_names_the_default_prior_and_the_command_line_overrides_it(tmp_path):
    site = _site_yaml(tmp_path, "stanford_knee")
    spec = adapt.spec_from_args(adapt.parse_args(["--site", str(site)]))
    assert spec.prior.args[0] == resolve_prior("stanford_knee")
    assert "stanford_knee" in spec.prior_reason and "key 'prior'" in spec.prior_reason
    spec = adapt.spec_from_args(adapt.parse_args(["--site", str(site), "--prior", "source_brain"]))
    assert spec.prior.args[0] == resolve_prior("source_brain") and "command line" in spec.prior_reason
    spec = adapt.spec_from_args(adapt.parse_args(["--site", str(_site_yaml(tmp_path, None))]))
    assert spec.prior.args[0] == resolve_prior("source_brain") and "names no prior" in spec.prior_reason


def test_every_shipped_site_names_a_bundled_prior():
    """Brain sites the real brain prior, knee sites the knee prior, template sites the template prior."""
    from omegaconf import OmegaConf

    from recon.data.sites import SITES_DIR, available_sites

    expected = {"colin27_t1": "colin27_t1", "fastmri_brain": "colin27_t1", "stanford_knee": "stanford_knee",
                "fastmri_knee": "stanford_knee", "source_brain": "source_brain", "unseen_protocol": "source_brain"}
    for name in available_sites():  # read as YAML: loading an image site needs its (unshipped) stack
        assert resolve_prior(OmegaConf.load(SITES_DIR / f"{name}.yaml").prior).is_file(), name
    for name, prior in expected.items():
        text = (ROOT / "configs" / "sites" / f"{name}.yaml").read_text()
        assert f"\nprior: {prior} " in text, name


def test_a_site_naming_a_missing_prior_exits_2_naming_the_site_key(tmp_path, capsys):
    site = _site_yaml(tmp_path, "no_such_prior")
    out = tmp_path / "out"
    _assert_bad_input(capsys, out, ["--site", str(site), "--out", str(out)],
                      f"{site}: key 'prior' is 'no_such_prior'")
