"""fastMRI h5 reader / writer: round trips, parity with fastMRI's own code, scale, masks, errors."""

from __future__ import annotations

import argparse

import fastmri
import fastmri.data
import fastmri.evaluate
import h5py
import numpy as np
import pytest
import torch

from recon.coils import rss
from recon.data import FastMRISliceDataset, ismrmrd_header, slice_mask_seed, write_reconstructions
from recon.data.sites import simulate_site
from recon.errors import InputError
from recon.fft import ifft2c
from recon.masks import make_mask


def zero_filled(sample) -> torch.Tensor:
    return rss(ifft2c(sample.kspace), dim=0)


def test_round_trip_at_acceleration_one_gives_the_stored_target(sim_file):
    dataset = FastMRISliceDataset(sim_file)  # no retrospective mask: fully sampled
    with h5py.File(sim_file, "r") as hf:
        stored = hf["reconstruction_rss"][()]
        raw = hf["kspace"][()]
    assert len(dataset) == stored.shape[0] == 2
    for i in range(len(dataset)):
        sample = dataset[i]
        assert float(sample.mask.min()) == 1.0
        torch.testing.assert_close(zero_filled(sample), sample.target, rtol=1e-5, atol=1e-6)
        # the normalised target is the stored one divided by the scale; the k-space likewise
        np.testing.assert_allclose(sample.target.numpy() * sample.scale, stored[i], rtol=1e-5)
        np.testing.assert_allclose(sample.kspace.numpy() * sample.scale, raw[i], rtol=1e-5, atol=1e-6 * np.abs(raw[i]).max())


def test_fastmri_slicedataset_opens_simulated_files_and_agrees(sim_dir, sim_file):
    theirs = fastmri.data.SliceDataset(sim_dir, challenge="multicoil")
    ours = FastMRISliceDataset(sim_dir)
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        kspace, mask, target, attrs, fname, slice_idx = theirs[i]
        sample = ours[i]
        assert fname == sample.fname and slice_idx == sample.slice_idx
        assert mask is None  # fully sampled, retrospective
        np.testing.assert_allclose(sample.kspace.numpy() * sample.scale, kspace, rtol=1e-5, atol=1e-6 * np.abs(kspace).max())
        assert attrs["padding_left"] == 0 and attrs["padding_right"] == kspace.shape[-1]
        assert attrs["encoding_size"][:2] == kspace.shape[-2:]
        # fastMRI's own RSS of its own ifft2c equals the stored target
        image = fastmri.ifft2c(torch.view_as_real(torch.from_numpy(kspace)))
        np.testing.assert_allclose(fastmri.rss(fastmri.complex_abs(image), dim=0).numpy(), target, rtol=1e-4, atol=1e-5 * target.max())
        assert attrs["acquisition"] == sample.acquisition == "AXT1"
        assert sample.max_value == pytest.approx(attrs["max"] / sample.scale)
        assert sample.noise_sigma == pytest.approx(attrs["noise_sigma"] / sample.scale)


def test_retrospective_mask_is_seeded_per_file_and_slice(sim_file, tiny_site):
    acq = tiny_site.acquisition
    dataset = FastMRISliceDataset(sim_file, mask_type=acq.mask_type, acceleration=acq.acceleration,
                                  center_fraction=acq.center_fraction, mask_seed=7)
    for i in range(len(dataset)):
        sample = dataset[i]
        expected, _ = make_mask(acq.mask_type, (64, 64), acq.acceleration, acq.center_fraction,
                                slice_mask_seed(7, sim_file.name, i))
        torch.testing.assert_close(sample.mask, expected)
        assert bool((sample.kspace[:, sample.mask == 0] == 0).all())
    assert torch.equal(dataset[0].mask, FastMRISliceDataset(sim_file, mask_type=acq.mask_type, acceleration=acq.acceleration,
                                                            center_fraction=acq.center_fraction, mask_seed=7)[0].mask)


def test_prospective_file_mask_is_inferred_and_matches_retrospective(tmp_path, tiny_site, sim_file):
    acq = tiny_site.acquisition
    (path,) = simulate_site(tiny_site, tmp_path, seed=5, prospective=True)
    with h5py.File(path, "r") as hf:
        assert "mask" not in hf
        assert bool((np.abs(hf["kspace"][()]) == 0).any())
    # a retrospective mask request does not touch prospectively undersampled data
    prospective = FastMRISliceDataset(path, mask_type="random_1d", acceleration=8.0, center_fraction=0.04)
    retrospective = FastMRISliceDataset(sim_file, mask_type=acq.mask_type, acceleration=acq.acceleration,
                                        center_fraction=acq.center_fraction, mask_seed=acq.mask_seed)
    assert path.name == sim_file.name  # same name, same per-slice mask seeds
    for i in range(len(prospective)):
        a, b = prospective[i], retrospective[i]
        torch.testing.assert_close(a.mask, b.mask)
        assert a.acceleration == pytest.approx(acq.acceleration, rel=0.1)
        assert a.scale == pytest.approx(b.scale, rel=1e-6)
        torch.testing.assert_close(a.kspace, b.kspace)


def test_mask_dataset_in_file_is_used(tmp_path, sim_file, copy_h5):
    column = np.zeros(64, dtype=bool)
    column[::3] = True
    column[28:36] = True
    path = copy_h5(sim_file, tmp_path / "with_mask.h5", replace={"mask": column})
    sample = FastMRISliceDataset(path, mask_type="equispaced_1d", acceleration=4.0)[0]
    torch.testing.assert_close(sample.mask, torch.from_numpy(column).float().expand(64, 64))


def test_padding_columns_outside_the_encoded_region_do_not_count_as_undersampling(tmp_path, sim_file, copy_h5):
    with h5py.File(sim_file, "r") as hf:
        kspace = hf["kspace"][()]
    kspace[..., :4] = 0
    kspace[..., -4:] = 0
    header = ismrmrd_header((64, 64)).replace(b"<maximum>63</maximum><center>32</center>", b"<maximum>55</maximum><center>28</center>")
    path = copy_h5(sim_file, tmp_path / "padded.h5", replace={"kspace": kspace, "ismrmrd_header": np.bytes_(header)})
    theirs = fastmri.data.SliceDataset(tmp_path, challenge="multicoil")
    assert (theirs.raw_samples[0].metadata["padding_left"], theirs.raw_samples[0].metadata["padding_right"]) == (4, 60)
    sample = FastMRISliceDataset(path, mask_type="equispaced_1d", acceleration=4.0, center_fraction=0.08)[0]
    expected, _ = make_mask("equispaced_1d", (64, 64), 4.0, 0.08, slice_mask_seed(0, path.name, 0))
    expected[:, :4] = 0
    expected[:, 60:] = 0
    torch.testing.assert_close(sample.mask, expected)


def test_raw_scale_is_normalised_away_and_restored(tmp_path, sim_file, copy_h5):
    (tmp_path / "big").mkdir()
    big = copy_h5(sim_file, tmp_path / "big" / sim_file.name, scale=1e13)  # same name: same mask seeds
    a = FastMRISliceDataset(sim_file, mask_type="equispaced_1d", acceleration=4.0)[1]
    b = FastMRISliceDataset(big, mask_type="equispaced_1d", acceleration=4.0)[1]
    assert b.scale / a.scale == pytest.approx(1e13, rel=1e-5)
    torch.testing.assert_close(b.kspace, a.kspace, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.target, a.target, rtol=1e-5, atol=1e-6)
    assert b.noise_sigma == pytest.approx(a.noise_sigma, rel=1e-5)
    assert b.max_value == pytest.approx(a.max_value, rel=1e-5)
    out_a = write_reconstructions(tmp_path / "out_a", sim_file.name, a.denormalize(zero_filled(a))[None])
    out_b = write_reconstructions(tmp_path / "out_b", big.name, b.denormalize(zero_filled(b))[None])
    with h5py.File(out_a, "r") as ha, h5py.File(out_b, "r") as hb:
        ra, rb = ha["reconstruction"][()], hb["reconstruction"][()]
    assert rb.dtype == np.float32 and rb.shape == (1, 64, 64)
    np.testing.assert_allclose(rb, 1e13 * ra, rtol=1e-4, atol=1e-6 * rb.max())


def test_writer_output_is_scored_by_fastmri_evaluate(tmp_path, sim_file, copy_h5):
    sim_dir = tmp_path / "targets"
    sim_dir.mkdir()
    sim_file = copy_h5(sim_file, sim_dir / sim_file.name, scale=1e6)  # a raw scale far from 1
    dataset = FastMRISliceDataset(sim_dir, mask_type="equispaced_1d", acceleration=4.0)
    samples = [dataset[i] for i in dataset.slices_of(sim_file.name)]
    volume = torch.stack([s.denormalize(zero_filled(s)) for s in samples])
    path = write_reconstructions(tmp_path / "recons", sim_file.name, volume)
    assert path.name == sim_file.name
    assert sorted(p.name for p in path.parent.iterdir()) == [sim_file.name]  # no temporary file left
    args = argparse.Namespace(target_path=sim_dir, predictions_path=path.parent, acquisition=None, acceleration=None)
    metrics = fastmri.evaluate.evaluate(args, "reconstruction_rss")
    with h5py.File(sim_file, "r") as hf:
        stored = hf["reconstruction_rss"][()]
    # each slice has its own scale: the raw-scale volume is what fastMRI scores
    expected = float(fastmri.evaluate.nmse(stored, volume.numpy()))
    per_slice = [float(fastmri.evaluate.nmse(s.target.numpy(), zero_filled(s).numpy())) for s in samples]
    assert min(per_slice) <= expected <= max(per_slice)
    assert 1e-4 < expected < 0.5
    assert metrics.means()["NMSE"] == pytest.approx(expected, rel=1e-3)


def test_writer_refuses_input_files_and_bad_volumes(tmp_path, sim_dir, sim_file):
    with pytest.raises(InputError, match=r"kspace") as err:
        write_reconstructions(sim_dir, sim_file.name, np.zeros((2, 64, 64), np.float32))
    assert sim_file.name in str(err.value)
    bad = np.zeros((2, 64, 64), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"'reconstruction'.*NaN"):
        write_reconstructions(tmp_path / "out", "file1.h5", bad)
    with pytest.raises(InputError, match=r"'reconstruction'.*shape"):
        write_reconstructions(tmp_path / "out", "file1.h5", np.zeros((64, 64), np.float32))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- item 6 errors


def _read_all(path):
    dataset = FastMRISliceDataset(path)
    return [dataset[i] for i in range(len(dataset))]


def _expect(path, key, pattern=""):
    with pytest.raises(InputError) as err:
        _read_all(path)
    message = str(err.value)
    assert path.name in message and f"'{key}'" in message, message
    assert pattern.lower() in message.lower(), message
    return message


def test_error_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file") as err:
        FastMRISliceDataset(tmp_path / "absent.h5")
    assert "absent.h5" in str(err.value) and "'kspace'" in str(err.value)
    with pytest.raises(InputError, match="file not found"):
        FastMRISliceDataset([tmp_path / "absent.h5"])
    with pytest.raises(InputError, match="no .h5 files"):
        FastMRISliceDataset(tmp_path)


def test_error_missing_kspace_key(tmp_path, write_h5):
    path = write_h5(tmp_path / "nokspace.h5", {"reconstruction_rss": np.ones((1, 8, 8), np.float32)})
    _expect(path, "kspace", "missing")


def test_error_kspace_not_complex(tmp_path, write_h5):
    path = write_h5(tmp_path / "real.h5", {"kspace": np.ones((1, 2, 8, 8), np.float32)})
    _expect(path, "kspace", "complex")


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 2, 8, 8)])
def test_error_kspace_wrong_rank(tmp_path, write_h5, shape):
    path = write_h5(tmp_path / "rank.h5", {"kspace": np.ones(shape, np.complex64)})
    _expect(path, "kspace", "rank")


def test_error_mask_does_not_broadcast(tmp_path, sim_file, copy_h5):
    path = copy_h5(sim_file, tmp_path / "badmask.h5", replace={"mask": np.ones(65, bool)})
    _expect(path, "mask", "does not fit")


def test_error_all_zero_mask(tmp_path, sim_file, copy_h5):
    path = copy_h5(sim_file, tmp_path / "zeromask.h5", replace={"mask": np.zeros(64, bool)})
    _expect(path, "mask", "all zero")


def test_error_all_zero_kspace(tmp_path, write_h5):
    path = write_h5(tmp_path / "zeros.h5", {"kspace": np.zeros((1, 2, 16, 16), np.complex64)})
    _expect(path, "kspace", "all zero")


def test_error_nan_or_inf_values(tmp_path, sim_file, copy_h5):
    with h5py.File(sim_file, "r") as hf:
        kspace, target = hf["kspace"][()], hf["reconstruction_rss"][()]
    kspace[0, 1, 5, 5] = np.nan
    _expect(copy_h5(sim_file, tmp_path / "nan.h5", replace={"kspace": kspace}), "kspace", "NaN or Inf")
    target[1, 3, 3] = np.inf
    _expect(copy_h5(sim_file, tmp_path / "inf.h5", replace={"reconstruction_rss": target}), "reconstruction_rss", "NaN or Inf")


def test_error_sensitivity_maps_do_not_match(tmp_path, sim_file, copy_h5):
    maps = np.ones((2, 3, 64, 64), np.complex64)  # 3 coils, k-space has 4
    _expect(copy_h5(sim_file, tmp_path / "maps.h5", replace={"sens_maps": maps}), "sens_maps", "k-space shape")
    with h5py.File(sim_file, "r") as hf:
        maps = hf["sens_maps"][()]
    maps[1, 0, 0, 0] = np.inf
    _expect(copy_h5(sim_file, tmp_path / "maps_inf.h5", replace={"sens_maps": maps}), "sens_maps", "NaN or Inf")


def test_singlecoil_files_give_one_coil_and_the_esc_target(tmp_path, sim_file, write_h5):
    with h5py.File(sim_file, "r") as hf:
        kspace = hf["kspace"][:, 0]  # (slices, H, W)
        header = hf["ismrmrd_header"][()]
    esc = rss(ifft2c(torch.from_numpy(kspace)[:, None]), dim=1).numpy()
    folder = tmp_path / "singlecoil"
    folder.mkdir()
    path = write_h5(folder / "sc.h5", {"kspace": kspace, "reconstruction_esc": esc, "ismrmrd_header": np.bytes_(header)},
                    {"acquisition": "CORPD_FBK", "max": float(esc.max())})
    dataset = FastMRISliceDataset(path)
    assert dataset.volumes[0].recon_size == (64, 64) and not dataset.volumes[0].multicoil
    theirs = fastmri.data.SliceDataset(folder, challenge="singlecoil")
    for i in range(2):
        sample = dataset[i]
        assert sample.kspace.shape == (1, 64, 64) and sample.acquisition == "CORPD_FBK"
        torch.testing.assert_close(zero_filled(sample), sample.target, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sample.target.numpy() * sample.scale, theirs[i][2], rtol=1e-5)
