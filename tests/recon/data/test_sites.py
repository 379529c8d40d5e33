"""Sites: config loading and errors, the simulator (determinism, noise, coils, anatomy), training images."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import sigpy.mri
import torch

from recon.data import FastMRISliceDataset, normalization_scale
from recon.data.acquisition import birdcage_sens_maps, coil_noise_covariance, complex_noise
from recon.data.anatomy import load_anatomy, random_subject, render_slice
from recon.data.sites import (
    EVAL_STREAM,
    TRAIN_STREAM,
    available_sites,
    load_site,
    simulate_site,
    site_dataset,
    subject_seed,
    training_images,
)
from recon.errors import InputError
from recon.fft import fft2c

TINY = ["acquisition.matrix=[64,64]", "data.num_subjects=1", "data.slices_per_subject=2", "coils.count=4"]
IMAGE_SITES = ("stanford_knee", "siat_head_t2", "colin27_t1", "colin27_t1_coronal", "colin27_t1_sagittal")
"""Sites that need ../shared/data/real: tested on generated stacks (test_images.py)."""


# ------------------------------------------------------------------------------------ configs


def test_shipped_sites_differ_from_the_source_as_documented():
    names = set(available_sites())
    assert {"source_brain", "unseen_center", "unseen_anatomy", "unseen_protocol", "real_epi",
            "fastmri_knee", "fastmri_brain"} <= names
    src = load_site("source_brain")
    assert (src.anatomy.source, src.anatomy.contrast, src.anatomy.orientation, src.coils.count) == ("mni152", "t1", "axial", 8)
    assert (src.acquisition.mask_type, src.acquisition.acceleration) == ("equispaced_1d", 4.0)
    center = load_site("unseen_center")
    assert center.anatomy.contrast != "t1" and center.coils.count != 8
    assert center.coils.radius != src.coils.radius and center.coils.rotation_deg != src.coils.rotation_deg
    assert center.noise.sigma >= 3 * src.noise.sigma
    assert center.acquisition.mask_type != src.acquisition.mask_type
    assert (center.acquisition.mask_type, center.acquisition.acceleration) == ("poisson_2d", 8.0)  # a 2-D protocol
    assert center.prior == "stanford_knee"  # a prior from another centre and anatomy
    assert load_site("unseen_anatomy").anatomy.orientation != "axial"
    protocol = load_site("unseen_protocol")
    assert (protocol.acquisition.mask_type, protocol.acquisition.acceleration) == ("poisson_2d", 8.0)
    assert protocol.acquisition.matrix != src.acquisition.matrix
    assert load_site("real_epi").anatomy.source == "epi"
    # no two evaluation folders of simulated anatomy share subjects (image stacks have splits instead)
    simulated = [n for n in names if not n.startswith("fastmri_") and n not in IMAGE_SITES
                 and load_site(n).anatomy.source != "images"]
    offsets = [load_site(n).data.subject_seed_offset for n in simulated]
    assert len(set(offsets)) == len(offsets)


def test_overrides_are_applied():
    site = load_site("source_brain", ["acquisition.acceleration=8", "acquisition.center_fraction=0.08",
                                      "noise.sigma=0.02", "acquisition.matrix=[96,80]"])
    assert site.acquisition.acceleration == 8.0 and site.noise.sigma == 0.02
    assert site.acquisition.matrix == [96, 80]


def test_unknown_site_lists_known_sites():
    with pytest.raises(InputError) as err:
        load_site("nowhere")
    message = str(err.value)
    assert "'site'" in message and "'nowhere'" in message and "source_brain" in message and "unseen_center" in message


@pytest.mark.parametrize("override, key", [("acquisition.accel=8", "acquisition.accel"), ("coils.count=many", "coils.count")])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(InputError) as err:
        load_site("source_brain", [override])
    assert f"'{key}'" in str(err.value) and "source_brain.yaml" in str(err.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("coils:\n  count: 8\n  radios: 2.0\n", "coils.radios"),
        ("coils:\n  radius: 1.0\n", "coils.radius"),
        ("anatomy:\n  contrast: t7\n", "anatomy.contrast"),
        ("anatomy:\n  source: epi\n  contrast: t2\n", "anatomy.contrast"),
        ("acquisition:\n  mask_type: spiral\n", "acquisition.mask_type"),
        ("acquisition:\n  acceleration: 1.0\n", "acquisition.acceleration"),
        ("data:\n  source: dicom\n", "data.source"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "mysite.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_site(str(path))
    assert "mysite.yaml" in str(err.value) and f"'{key}'" in str(err.value)


def test_fastmri_sites_need_an_existing_root(tmp_path, sim_file):
    with pytest.raises(InputError) as err:
        load_site("fastmri_knee")
    assert "fastmri_knee.yaml" in str(err.value) and "'data.root'" in str(err.value)
    with pytest.raises(InputError, match=r"fastmri_brain\.yaml: key 'data\.root'.*not an existing folder"):
        load_site("fastmri_brain", [f"data.root={tmp_path / 'absent'}"])
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "file1.h5").write_bytes(sim_file.read_bytes())
    site = load_site("fastmri_knee", [f"data.root={tmp_path / 'val'}"])
    dataset = site_dataset(site)
    sample = dataset[0]
    assert sample.fname == "file1.h5"
    assert sample.acceleration == pytest.approx(4.0, rel=0.1)  # the site's random 1-D 4x mask was applied
    with pytest.raises(InputError, match="'data.source'.*'simulated'"):
        simulate_site(site, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- simulator


def _datasets(path):
    with h5py.File(path, "r") as hf:
        return {k: hf[k][()] for k in hf.keys()}, dict(hf.attrs)


def test_simulator_is_byte_for_byte_deterministic(tmp_path, tiny_site, sim_file):
    (again,) = simulate_site(tiny_site, tmp_path / "again", seed=5)
    assert again.read_bytes() == sim_file.read_bytes()
    (other,) = simulate_site(tiny_site, tmp_path / "other", seed=6)
    a, attrs_a = _datasets(sim_file)
    b, attrs_b = _datasets(other)
    assert attrs_a["seed"] == 5 and attrs_b["seed"] == 6
    assert not np.allclose(a["reconstruction_rss"], b["reconstruction_rss"], atol=0.05 * a["reconstruction_rss"].max())
    np.testing.assert_array_equal(a["sens_maps"], b["sens_maps"])  # coils are the site's, not the subject's


def test_simulated_file_layout(sim_file, tiny_site):
    data, attrs = _datasets(sim_file)
    assert data["kspace"].dtype == np.complex64 and data["kspace"].shape == (2, 4, 64, 64)
    assert data["reconstruction_rss"].dtype == np.float32 and data["reconstruction_rss"].shape == (2, 64, 64)
    assert data["sens_maps"].shape == (2, 4, 64, 64)
    assert attrs["max"] == pytest.approx(float(data["reconstruction_rss"].max()))
    assert attrs["norm"] == pytest.approx(float(np.linalg.norm(data["reconstruction_rss"])), rel=1e-5)
    assert attrs["acquisition"] == "AXT1" and attrs["site"] == "source_brain" and attrs["noise_sigma"] > 0


def test_noise_has_the_stored_sigma_and_coil_correlation(tmp_path):
    overrides = TINY + ["coils.correlation=0.5", "noise.sigma=0.05"]
    noisy_site = load_site("source_brain", overrides)
    clean_site = load_site("source_brain", overrides + ["noise.sigma=0.0"])
    (noisy,) = simulate_site(noisy_site, tmp_path / "noisy", seed=2)
    (clean,) = simulate_site(clean_site, tmp_path / "clean", seed=2)
    a, attrs = _datasets(noisy)
    b, _ = _datasets(clean)
    noise = (a["kspace"] - b["kspace"]).astype(np.complex128)  # same subject, only the noise differs
    sigma = attrs["noise_sigma"]
    assert np.sqrt(np.mean(np.abs(noise) ** 2)) == pytest.approx(sigma, rel=0.02)
    flat = noise.transpose(1, 0, 2, 3).reshape(4, -1)
    cov = (flat @ flat.conj().T).real / flat.shape[1] / sigma**2
    np.testing.assert_allclose(cov, coil_noise_covariance(4, 0.5), atol=0.03)
    # the noise level relative to a normalised slice is the site's sigma
    scale = np.median([normalization_scale(torch.from_numpy(k)) for k in b["kspace"]])
    assert sigma / scale == pytest.approx(0.05, rel=1e-5)


def test_complex_noise_covariance():
    cov = coil_noise_covariance(6, 0.4)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    n = complex_noise(np.random.default_rng(0), (6, 128, 128), 0.3, cov).reshape(6, -1).astype(np.complex128)
    np.testing.assert_allclose((n @ n.conj().T) / n.shape[1], 0.09 * cov, atol=0.004)
    assert abs(np.mean(n.real**2) - 0.045) < 0.002  # circular: half the power in each part


def test_birdcage_maps_match_sigpy_and_rotate():
    maps = birdcage_sens_maps(8, (64, 64), 1.5, 0.0)
    np.testing.assert_allclose(np.sqrt((np.abs(maps) ** 2).sum(0)), 1.0, rtol=1e-5)
    grid = 2 * int(np.ceil((np.sqrt(2 * 64**2) + 4) / 2))
    ref = sigpy.mri.birdcage_maps((8, grid, grid), r=1.5 * 64 / grid)
    lo = grid // 2 - 32
    ref = ref[:, lo:lo + 64, lo:lo + 64]
    ref = ref / np.sqrt((np.abs(ref) ** 2).sum(0))
    np.testing.assert_allclose(maps, ref, atol=1e-5)
    # rotating the ring by one coil spacing relabels the coils (magnitudes)
    rotated = birdcage_sens_maps(8, (64, 64), 1.5, 45.0)
    errors = [np.abs(np.abs(rotated) - np.abs(np.roll(maps, k, axis=0))).max() for k in range(8)]
    assert min(errors) < 0.02 and sorted(errors)[1] > 0.1
    assert np.abs(np.abs(rotated) - np.abs(maps)).max() > 0.1


def test_anatomy_orientation_and_contrast():
    anatomy = load_anatomy("mni152")
    identity = random_subject(np.random.default_rng(0), anatomy, 0.0, 0.0)
    for orientation in ("axial", "coronal"):  # the symmetric MNI template is mirror-symmetric left-right
        image = render_slice(anatomy, identity, "t1", orientation, 0.0, (96, 96))
        assert np.abs(image - image[:, ::-1]).mean() < 0.05 * image.mean()
    subject = random_subject(np.random.default_rng(1), anatomy, 3.0, 0.2)
    assert np.abs(render_slice(anatomy, subject, "t1", "axial", 0.0, (96, 96)) - image).mean() > 0.05 * image.mean()
    t1 = render_slice(anatomy, identity, "t1", "axial", 10.0, (96, 96))
    brain = t1 > 0.05
    csf = brain & (t1 < 0.4)
    wm = t1 > 0.85
    assert csf.sum() > 20 and wm.sum() > 200
    for contrast, brighter in (("t2", True), ("pd", True), ("flair", False)):
        image = render_slice(anatomy, identity, contrast, "axial", 10.0, (96, 96))
        assert (image[csf].mean() > image[wm].mean()) == brighter, contrast


# ----------------------------------------------------------------------------- training images


def test_training_images_are_normalised_like_samples_and_deterministic(tiny_site):
    images = training_images(tiny_site, num_slices=20, seed=4)
    assert images.shape == (20, 1, 64, 64) and images.dtype == torch.complex64
    maps = birdcage_sens_maps(4, (64, 64), tiny_site.coils.radius, tiny_site.coils.rotation_deg)
    kspace = fft2c(torch.from_numpy(maps)[None] * images)
    for k in kspace:
        assert normalization_scale(k) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(images, training_images(tiny_site, num_slices=20, seed=4))
    assert not torch.allclose(images[:4], training_images(tiny_site, num_slices=4, seed=5))
    assert float(images.angle().std()) > 0.3  # the smooth background phase is there
    # different slices of different subjects
    assert (images[:, 0, 32] - images[:1, 0, 32]).abs().amax(dim=-1)[1:].min() > 1e-3


def test_training_and_evaluation_subjects_never_share_seeds(tiny_site, sim_file):
    for seed in (0, 5):
        train = {tuple(subject_seed(seed, TRAIN_STREAM, j).generate_state(4)) for j in range(50)}
        evaluate = {tuple(subject_seed(seed, EVAL_STREAM, i).generate_state(4)) for i in range(1000)}
        assert len(train) == 50 and not train & evaluate
    # and the images differ: no training slice equals an evaluation target of the same seed
    images = training_images(tiny_site, num_slices=16, seed=5).abs()[:, 0]
    sample = FastMRISliceDataset(sim_file)[0]
    target = sample.target / sample.target.max()
    assert all(float((img / img.max() - target).abs().mean()) > 0.01 for img in images)


def test_site_dataset_reuses_current_files_and_resimulates_changed_ones(tmp_path, tiny_site):
    dataset = site_dataset(tiny_site, tmp_path, seed=1)
    (path,) = dataset.files
    before = path.stat().st_mtime_ns
    assert site_dataset(tiny_site, tmp_path, seed=1)[0].acceleration == pytest.approx(4.0, rel=0.1)
    assert path.stat().st_mtime_ns == before
    noisier = load_site("source_brain", TINY + ["noise.sigma=0.05"])
    site_dataset(noisier, tmp_path, seed=1)
    with h5py.File(path, "r") as hf:
        assert "sigma: 0.05" in hf.attrs["site_config"]
    with pytest.raises(InputError, match="'workdir'"):
        site_dataset(tiny_site)
