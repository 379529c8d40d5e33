"""Image-stack sites: reading, splits, simulation at the images' own matrix, the clean reference, training images.

Every stack here is a small generated array (the project never needs ../shared/data/real to test).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fastmri.data.transforms import center_crop

from recon.coils import rss
from recon.data import FastMRISliceDataset
from recon.data.fastmri_io import REFERENCE_KEY
from recon.data.images import (fit_matrix, parse_index_ranges, read_image_stack, reslice, split_indices,
                               target_images)
from recon.data.sites import SITES_DIR, load_site, simulate_site, site_dataset, training_images
from recon.errors import InputError
from recon.fft import ifft2c

ROOT = Path(__file__).resolve().parents[3]
KNEE = str(SITES_DIR / "stanford_knee.yaml")


def smooth_stack(n: int, shape: tuple[int, int], complex_: bool, seed: int = 0) -> np.ndarray:
    """``n`` distinct smooth blobs (ellipses with texture) of the given shape; complex ones with a smooth phase."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.5, 0.8, 2)
        body = ((yy / a) ** 2 + (xx / b) ** 2 < 1).astype(float)
        texture = 1 + 0.3 * np.sin(rng.uniform(3, 9) * yy + rng.uniform(0, 6)) * np.cos(rng.uniform(3, 9) * xx)
        image = body * texture * rng.uniform(0.5, 2.0)
        if complex_:
            image = image * np.exp(1j * (rng.uniform(-np.pi, np.pi) + 0.8 * yy * xx + 0.5 * xx))
        out.append(image)
    return np.stack(out).astype(np.complex64 if complex_ else np.float32)


def stack_site(path: Path, *extra: str) -> list[str]:
    """Overrides making the shipped knee site read a generated stack of 8 slices, 4 coils, small."""
    return [f"anatomy.path={path}", "data.splits.train=[\"0:4\"]", "data.splits.val=[\"4:5\"]",
            "data.splits.test=[\"5:8\"]", "coils.count=4", *extra]


@pytest.fixture()
def magnitude_stack(tmp_path: Path) -> Path:
    path = tmp_path / "mag.npy"
    np.save(path, smooth_stack(8, (40, 36), complex_=False) * 1e7)  # a raw scanner-like scale
    return path


@pytest.fixture()
def complex_stack(tmp_path: Path) -> Path:
    path = tmp_path / "cplx.npz"
    np.savez(path, images=smooth_stack(8, (40, 36), complex_=True) * 1e-6)
    return path


# ------------------------------------------------------------------------------------ reading and splits


def test_read_image_stack_formats(tmp_path: Path) -> None:
    stack = smooth_stack(3, (12, 10), complex_=True)
    np.save(tmp_path / "a.npy", stack)
    np.savez(tmp_path / "b.npz", x=stack, y=stack.real)
    assert np.array_equal(read_image_stack(tmp_path / "a.npy"), stack.astype(np.complex128))
    assert np.array_equal(read_image_stack(tmp_path / "b.npz", "y"), stack.real.astype(np.float64))
    with pytest.raises(InputError, match="anatomy.key"):
        read_image_stack(tmp_path / "b.npz")  # two arrays, no key
    import nibabel as nib

    volume = np.abs(stack).transpose(1, 2, 0)  # NIfTI (X, Y, Z): slices along the third axis
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(tmp_path / "c.nii.gz"))
    assert np.allclose(read_image_stack(tmp_path / "c.nii.gz"), np.abs(stack), atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 8, 8)), "all zero"),
    (np.full((2, 8, 8), np.nan), "NaN"),
    (np.ones((2, 2, 8, 8)), r"shape \(N, H, W\)"),
])
def test_read_image_stack_rejects_bad_arrays(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InputError, match=message):
        read_image_stack(tmp_path / "bad.npy")


def test_pickled_stack_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot be read"):
        read_image_stack(tmp_path / "obj.npy")


def test_index_ranges_and_disjoint_splits() -> None:
    assert parse_index_ranges(["0:3", 5, "7:9"], 10, "x") == [0, 1, 2, 5, 7, 8]
    for bad in (["3:3"], ["0:11"], ["a:b"], []):
        with pytest.raises(InputError, match="key 'x'"):
            parse_index_ranges(bad, 10, "x")
    splits = split_indices({"train": ["0:10"], "val": ["10:12"], "test": ["12:18"]}, 18, "site")
    assert splits == {"train": list(range(10)), "val": [10, 11], "test": list(range(12, 18))}
    with pytest.raises(InputError, match="'data.splits.train' and 'data.splits.test' share indices"):
        split_indices({"train": ["0:10"], "test": ["9:18"]}, 18, "site")


def test_stepped_ranges_and_slab_gaps() -> None:
    assert parse_index_ranges(["80:104:3"], 181, "x") == [80, 83, 86, 89, 92, 95, 98, 101]
    with pytest.raises(InputError, match="step >= 1"):
        parse_index_ranges(["0:9:0"], 10, "x")
    slabs = {"train": ["0:62", "110:166"], "val": ["67:75:2"], "test": ["80:104:3"]}
    got = split_indices(slabs, 181, "site", gap=5)
    assert got["val"] == [67, 69, 71, 73] and len(got["train"]) == 118
    every = sorted(i for v in got.values() for i in v)
    owner = {i: name for name, v in got.items() for i in v}
    for i, j in zip(every, every[1:]):  # neighbours from different splits have >= 5 slices between them
        assert owner[i] == owner[j] or j - i - 1 >= 5
    with pytest.raises(InputError, match="4 apart, expected at least 'data.split_gap' = 5"):
        split_indices({"train": ["0:62"], "val": ["66:75"]}, 181, "site", gap=5)
    assert split_indices({"train": ["0:62"], "val": ["66:75"]}, 181, "site", gap=4)["val"][0] == 66


def test_reslice_gives_coronal_and_sagittal_slices_superior_up() -> None:
    volume = np.arange(5 * 6 * 7, dtype=np.float64).reshape(5, 6, 7)  # (z, y, x), z up
    assert reslice(volume, "axial") is volume or np.array_equal(reslice(volume, "axial"), volume)
    coronal, sagittal = reslice(volume, "coronal"), reslice(volume, "sagittal")
    assert coronal.shape == (6, 5, 7) and sagittal.shape == (7, 5, 6)
    for z in range(5):
        assert np.array_equal(coronal[2, 4 - z, :], volume[z, 2, :])  # row 0 = the top slice
        assert np.array_equal(sagittal[3, 4 - z, :], volume[z, :, 3])
    with pytest.raises(InputError, match="anatomy.orientation"):
        reslice(volume, "oblique")


def test_fit_matrix_crops_like_fastmri_and_pads_back() -> None:
    image = np.arange(31 * 26, dtype=np.float64).reshape(31, 26)
    for size in ((31, 26), (20, 26), (30, 13), (7, 9)):
        expected = center_crop(torch.from_numpy(image), size).numpy()
        assert np.array_equal(fit_matrix(image, size), expected)
    padded = fit_matrix(image, (40, 30))
    assert padded.shape == (40, 30) and padded.sum() == image.sum()
    assert np.array_equal(fit_matrix(padded, (31, 26)), image)  # crop undoes the pad


# ------------------------------------------------------------------------------------ sites


def test_shipped_real_image_sites_are_fastmri_acquisitions(magnitude_stack: Path, complex_stack: Path) -> None:
    knee = load_site("stanford_knee", [f"anatomy.path={magnitude_stack}"] + stack_site(magnitude_stack)[1:])
    head = load_site("siat_head_t2", stack_site(complex_stack, "anatomy.key=images"))
    for site in (knee, head):
        assert site.anatomy.source == "images" and site.coils.count == 4
        assert (site.acquisition.mask_type, site.acquisition.acceleration) == ("random_1d", 4.0)
        assert site.acquisition.center_fraction == pytest.approx(0.08)
    eight = load_site("stanford_knee", stack_site(magnitude_stack, "acquisition.acceleration=8"))
    assert eight.acquisition.center_fraction == pytest.approx(0.04)  # fastMRI's 8x pairing
    # the committed configs name the real files relative to the project root, with the documented splits
    from omegaconf import OmegaConf

    raw = OmegaConf.load(SITES_DIR / "stanford_knee.yaml")
    assert raw.anatomy.path == "../shared/data/real/stanford_knee_rss.npy"
    assert dict(raw.data.splits) == {"train": ["0:10"], "val": ["10:12"], "test": ["12:18"]}
    raw = OmegaConf.load(SITES_DIR / "siat_head_t2.yaml")
    assert dict(raw.data.splits) == {"train": ["0:70"], "val": ["70:80"], "test": ["80:100"]}


def test_missing_stack_names_the_key_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.npy"
    with pytest.raises(InputError, match=rf"anatomy.path.*{missing.name}|{missing.name}.*anatomy.path"):
        load_site("stanford_knee", [f"anatomy.path={missing}"])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate_site.py"), "--site", "stanford_knee", "--out", str(out),
         f"anatomy.path={missing}"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "anatomy.path" in lines[0] and str(missing) in lines[0]
    assert not out.exists()


def test_overlapping_splits_are_refused(magnitude_stack: Path) -> None:
    with pytest.raises(InputError, match="share indices"):
        load_site("stanford_knee", stack_site(magnitude_stack, "data.splits.val=[\"3:5\"]"))
    with pytest.raises(InputError, match="data.split"):
        load_site("stanford_knee", stack_site(magnitude_stack, "data.split=holdout"))


def test_site_files_hold_exactly_the_split_at_the_images_own_matrix(tmp_path: Path, magnitude_stack: Path) -> None:
    site = load_site("stanford_knee", stack_site(magnitude_stack, "acquisition.matrix=[40,36]"))
    paths = simulate_site(site, tmp_path / "sim", seed=1)
    assert [p.name for p in paths] == ["stanford_knee_005.h5", "stanford_knee_006.h5", "stanford_knee_007.h5"]
    for k, path in zip((5, 6, 7), paths):
        with h5py.File(path, "r") as hf:
            assert hf["kspace"].shape == (1, 4, 40, 36)
            assert list(hf.attrs["stack_indices"]) == [k]
    val = simulate_site(load_site("stanford_knee", stack_site(magnitude_stack, "data.split=val",
                                                              "acquisition.matrix=[40,36]")), tmp_path / "val", seed=1)
    assert [p.name for p in val] == ["stanford_knee_004.h5"]


@pytest.mark.parametrize("kind", ["magnitude", "complex"])
def test_clean_reference_equals_the_input_image_and_complex_phase_is_kept(
        tmp_path: Path, magnitude_stack: Path, complex_stack: Path, kind: str) -> None:
    stack_path = magnitude_stack if kind == "magnitude" else complex_stack
    extra = ["anatomy.key=images"] if kind == "complex" else []
    matrix = [36, 40]  # crop H 40 -> 36, pad W 36 -> 40: the site's matrix, never resampled
    site = load_site("stanford_knee", stack_site(stack_path, f"acquisition.matrix=[{matrix[0]},{matrix[1]}]",
                                                 "noise.sigma=0.05", *extra))
    (path,) = simulate_site(site, tmp_path / kind, seed=2)[:1]
    images = read_image_stack(stack_path, "images" if kind == "complex" else None)
    expected = fit_matrix(images[5], tuple(matrix))
    with h5py.File(path, "r") as hf:
        reference = hf[REFERENCE_KEY][0]
        target = hf["reconstruction_rss"][0]
        kspace = torch.from_numpy(hf["kspace"][0])
        maps = torch.from_numpy(hf["sens_maps"][0])
    assert np.allclose(reference, np.abs(expected), rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(target, reference, rtol=1e-2)  # the fastMRI target carries the simulated noise
    # noiseless coil combination Σ conj(S_c) ifft2c(y_c) recovers the image; noise is the rest
    combined = (maps.conj() * ifft2c(kspace)).sum(0).numpy()
    err = np.abs(combined - expected) if kind == "complex" else np.abs(np.abs(combined) - expected)
    noise_floor = 0.05 * np.median(np.abs(expected[np.abs(expected) > 0])) * 4  # a few σ of the normalised noise
    body = np.abs(expected) > 0.5 * np.abs(expected).max()
    assert np.median(err[body]) < noise_floor
    phase_error = np.angle(combined[body] * np.conj(expected[body]))
    if kind == "complex":
        assert np.median(np.abs(phase_error)) < 0.1  # the image's own phase, not a new one
    else:
        assert np.std(np.angle(combined[body])) > 0.1  # magnitude images get a smooth background phase
    dataset = FastMRISliceDataset(path, mask_type="random_1d", acceleration=4, center_fraction=0.08)
    sample = dataset[0]
    assert sample.reference is not None
    assert torch.allclose(sample.reference * sample.scale, torch.from_numpy(reference), rtol=1e-5)


def test_raw_scale_site_and_stale_cache(tmp_path: Path, magnitude_stack: Path) -> None:
    site = load_site("stanford_knee", stack_site(magnitude_stack, "anatomy.intensity_scale=1e6",
                                                 "acquisition.matrix=[40,36]"))
    dataset = site_dataset(site, workdir=tmp_path)
    with h5py.File(dataset.files[0], "r") as hf:
        assert hf[REFERENCE_KEY][0].max() > 1e12  # 1e7 images times 1e6
    np.save(magnitude_stack, smooth_stack(8, (40, 36), complex_=False, seed=9) * 1e7)  # the file changes
    again = site_dataset(site, workdir=tmp_path)
    with h5py.File(again.files[0], "r") as hf:
        fresh = hf[REFERENCE_KEY][0]
    assert np.allclose(fresh, fit_matrix(np.load(magnitude_stack)[5], (40, 36)) * 1e6, rtol=1e-4,
                       atol=1e-5 * fresh.max())


# ------------------------------------------------------------------------------------ training images


def test_training_images_of_a_split_are_normalised_phase_draws(magnitude_stack: Path, complex_stack: Path) -> None:
    site = load_site("stanford_knee", stack_site(magnitude_stack, "acquisition.matrix=[40,36]"))
    images = training_images(site, split="train", copies=3, seed=0)
    assert images.shape == (12, 1, 40, 36) and images.dtype == torch.complex64
    mags = images.abs()[:, 0]
    stack = np.load(magnitude_stack)
    for k in range(4):  # slice-major: the copies of slice k share their magnitude up to the scale
        for r in range(3):
            m = mags[3 * k + r].numpy()
            ratio = stack[k][m > 0.1] / m[m > 0.1]
            assert np.allclose(ratio, ratio.mean(), rtol=1e-3)
        assert not torch.allclose(images[3 * k], images[3 * k + 1])  # fresh phases
    assert torch.equal(images, training_images(site, split="train", copies=3, seed=0))  # seeded
    val = training_images(site, split="val")
    assert val.shape[0] == 1
    with pytest.raises(InputError, match="num_slices"):
        training_images(site, num_slices=4)
    with pytest.raises(InputError, match="data.split"):
        training_images(site, split="holdout")
    head = load_site("siat_head_t2", stack_site(complex_stack, "anatomy.key=images", "acquisition.matrix=[40,36]"))
    turned = training_images(head, split="train", copies=2)
    original = read_image_stack(complex_stack, "images")[0]
    a, b = turned[0, 0].numpy(), turned[1, 0].numpy()
    body = np.abs(original) > 0.5 * np.abs(original).max()
    relative = a[body] * np.conj(original[body])  # a global phase (and a positive scale) apart
    assert np.std(np.angle(relative)) < 1e-3 and not np.allclose(a, b)


def test_target_images_of_a_fastmri_folder(tmp_path: Path, magnitude_stack: Path) -> None:
    site = load_site("stanford_knee", stack_site(magnitude_stack, "acquisition.matrix=[40,36]"))
    folder = tmp_path / "fastmri"
    simulate_site(site, folder, seed=0)
    images = target_images(folder, copies=2, seed=0)
    assert images.shape == (6, 40, 36) and images.dtype == np.complex64
    dataset = FastMRISliceDataset(folder)
    assert np.allclose(np.abs(images[0]), dataset[0].target.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(images[0], images[1])
