"""Hostile inputs (issue #9, item 3): corrupted h5 files, malformed YAML and dotlists, pickled checkpoints.

Every case runs ``scripts/adapt.py`` and, where the input applies to it, ``scripts/reconstruct.py``
in-process through ``main(argv)`` and asserts the contract of DESIGN.md ("bad input gets one clear
sentence naming the file, key and expected shape — never a deep traceback, never a half-written
output"): exit code 2; stderr is exactly one line, starting with ``error:`` and ending with a period;
it names the file (or ``command line`` / the config) and the problem; no traceback; the output
folder does not exist afterwards; every input file is byte-identical. stderr is captured at the file
descriptor (``capfd``), so anything HDF5's C library printed would count. Two subprocess runs show
that no traceback reaches a terminal, and a seeded byte-flip fuzz shows that a damaged file ends
either in a normal run or in that one line. Structure (keys, dtypes, shapes, sizes) is refused when
the dataset is opened, values (NaN/Inf) when a slice is read; with a folder, volumes finished before
a bad slice may be kept (volumes are the unit of work), nothing of the bad one.

Data: one 32 × 32, 4-coil, 1-slice fastMRI multicoil file written here (no simulator); adapt runs
use a tiny safetensors prior written here (fast to load) with ``--max-slices 1``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from recon.data import ismrmrd_header, write_kspace_volume
from scores.checkpoints import save_checkpoint
from scores.config import NetworkConfig, PriorConfig, prior_config_to_dict
from scores.model import ScoreModel
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
ADAPT = ROOT / "scripts" / "adapt.py"
RECONSTRUCT = ROOT / "scripts" / "reconstruct.py"


adapt = load_script("scripts/adapt.py", "hostile_adapt_script")
reconstruct = load_script("scripts/reconstruct.py", "hostile_reconstruct_script")
MAINS = {"adapt": adapt.main, "reconstruct": reconstruct.main}

COILS, H, W = 4, 32, 32
# a fastMRI site needs only data.root (set from --data); a wide ACS so ESPIRiT works at 32 x 32
ADAPT_SITE = ["site.acquisition.center_fraction=0.25", "site.acquisition.acceleration=3"]
RECON_SITE = ["acquisition.center_fraction=0.25", "acquisition.acceleration=3"]
FAST = ["biasrecon.num_steps=2", "biasrecon.lam_grid=[0.01,0.1]"]


# --------------------------------------------------------------------------------------------
# fixtures: a valid file and a tiny prior
# --------------------------------------------------------------------------------------------


def _valid_arrays() -> dict[str, np.ndarray]:
    """An ellipse with a smooth phase seen by 4 smooth coils, plus noise: fully sampled k-space."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    image = ((xx**2 / 0.6 + yy**2 / 0.8) < 0.7) * (1 + 0.3 * xx) * np.exp(0.5j * yy)
    angles = np.linspace(0, 2 * np.pi, COILS, endpoint=False)
    maps = np.stack([np.exp(-((xx - np.cos(a)) ** 2 + (yy - np.sin(a)) ** 2) / 2 + 1j * a) for a in angles])
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    coil_images = maps[None] * image[None, None]
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    rng = np.random.default_rng(0)
    kspace = kspace + 0.01 * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
    target = np.sqrt((np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"),
                                             axes=(-2, -1))) ** 2).sum(1))
    return {"kspace": kspace.astype(np.complex64), "reconstruction_rss": target.astype(np.float32),
            "sens_maps": np.broadcast_to(maps[None], kspace.shape).astype(np.complex64)}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """A valid fastMRI multicoil file: kspace, reconstruction_rss, sens_maps, ismrmrd_header, attributes."""
    arrays = _valid_arrays()
    path = tmp_path_factory.mktemp("valid") / "valid.h5"
    target = arrays["reconstruction_rss"]
    return write_kspace_volume(path, arrays["kspace"], target=target, sens_maps=arrays["sens_maps"],
                               header=ismrmrd_header((H, W)),
                               attrs={"acquisition": "AXT1", "max": float(target.max()),
                                      "norm": float(np.linalg.norm(target)), "noise_sigma": 0.01})


TINY_NETWORK = NetworkConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=False)


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> Path:
    """A safetensors prior small enough to load in milliseconds (random weights: errors only)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    return save_checkpoint(path, ScoreModel.from_config(TINY_NETWORK), {"config": PriorConfig(network=TINY_NETWORK)})


# --------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the inputs must come out byte-identical)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_line(err: str, fragments: list[str]) -> str:
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    line = err.strip()
    assert line.endswith("."), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def _assert_refused(script: str, argv: list[str], capfd, out: Path, fragments: list[str],
                    inputs: Path | None = None) -> str:
    """Run ``script``'s main in-process: exit 2, one ``error:`` line with ``fragments``, nothing written."""
    before = _snapshot(inputs) if inputs is not None else None
    capfd.readouterr()
    code = MAINS[script](argv)
    err = capfd.readouterr().err
    assert code == 2, err
    line = _assert_one_line(err, fragments)
    assert not out.exists(), f"{out} was created"
    if inputs is not None:
        assert _snapshot(inputs) == before, "an input file changed"
    return line


def _argv(script: str, data: Path, out: Path, prior: Path, extra: tuple[str, ...] = (), site: str = "fastmri_brain",
          ) -> list[str]:
    """The command line of a small run: one slice, the tiny prior (adapt), zero-filled (reconstruct). A site
    other than fastmri_brain (a YAML under test) gets no site overrides, which could mask its values."""
    if script == "adapt":
        return ["--site", site, "--data", str(data), "--out", str(out), "--max-slices", "1", "--prior", str(prior),
                *(ADAPT_SITE if site == "fastmri_brain" else []), *FAST, *extra]
    return ["--site", site, "--data", str(data), "--out", str(out), "--max-slices", "1", "--method", "zero_filled",
            *(RECON_SITE if site == "fastmri_brain" else []), *extra]


def test_the_valid_file_is_accepted(valid, tmp_path, capfd):
    """The control: the file every corruption starts from reconstructs (so refusals below are the corruption's)."""
    data = tmp_path / "in"
    data.mkdir()
    shutil.copy(valid, data / "valid.h5")
    before = _snapshot(data)
    out = tmp_path / "out"
    assert reconstruct.main(_argv("reconstruct", data / "valid.h5", out, Path())) == 0, capfd.readouterr().err
    assert (out / "reconstructions" / "zero_filled" / "valid.h5").is_file()
    assert _snapshot(data) == before


# --------------------------------------------------------------------------------------------
# corrupted h5 files
# --------------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, replace: dict | None = None, drop: tuple = (), attrs: dict | None = None,
             create: Callable[[h5py.File], None] | None = None) -> Path:
    """Copy ``src`` to ``dst`` with datasets replaced, dropped or created and attributes set (no validation)."""
    replace = replace or {}
    with h5py.File(src, "r") as source, h5py.File(dst, "w") as target:
        for key in source:
            if key not in drop and key not in replace:
                source.copy(key, target)
        for key, value in source.attrs.items():
            target.attrs[key] = value
        for key, value in replace.items():
            target.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            target.attrs[key] = value
        if create is not None:
            create(target)
    return dst


def _read(src: Path, key: str) -> np.ndarray:
    with h5py.File(src, "r") as hf:
        return hf[key][()]


def _with(key: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, Path], Path]:
    return lambda src, dst: _rewrite(src, dst, replace={key: change(_read(src, key))})


def _set(array: np.ndarray, index: tuple, value) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def _prospective(mask: np.ndarray | None) -> Callable[[Path, Path], Path]:
    """Undersampled k-space (every other column, a centre band) with ``mask`` stored as 'mask' (or none)."""
    def build(src: Path, dst: Path) -> Path:
        kspace = _read(src, "kspace")
        columns = np.zeros(W, bool)
        columns[::2] = True
        columns[W // 2 - 4: W // 2 + 4] = True
        replace = {"kspace": kspace * columns}
        if mask is not None:
            replace["mask"] = mask
        return _rewrite(src, dst, replace=replace)
    return build


def _declared(key: str, shape: tuple, dtype, chunks: tuple) -> Callable[[Path, Path], Path]:
    """A dataset with an absurd declared shape and no data written (the file stays small)."""
    def build(src: Path, dst: Path) -> Path:
        return _rewrite(src, dst, drop=(key,),
                        create=lambda hf: hf.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks))
    return build


def _bytes(change: Callable[[bytes], bytes]) -> Callable[[Path, Path], Path]:
    def build(src: Path, dst: Path) -> Path:
        dst.write_bytes(change(src.read_bytes()))
        return dst
    return build


def _corrupted_chunk(src: Path, dst: Path) -> Path:
    """k-space stored gzip-compressed per coil; the first chunk's compressed bytes overwritten (bit rot)."""
    kspace = _read(src, "kspace")
    _rewrite(src, dst, drop=("kspace",), create=lambda hf: hf.create_dataset(
        "kspace", data=kspace, chunks=(1, 1, H, W), compression="gzip"))
    with h5py.File(dst, "r") as hf:
        offset = hf["kspace"].id.get_chunk_info(0).byte_offset
    raw = bytearray(dst.read_bytes())
    raw[offset + 8: offset + 40] = b"\xff" * 32
    dst.write_bytes(bytes(raw))
    return dst


def _header_outside(src: Path, dst: Path) -> Path:
    header = ismrmrd_header((H, W)).decode().replace("<center>16</center>", "<center>-1000</center>")
    return _rewrite(src, dst, replace={"ismrmrd_header": np.bytes_(header.encode())})


@dataclass
class FileCase:
    """A corrupted input: ``build(valid, dst)`` writes it; the error line holds the path and ``fragments``."""

    id: str
    build: Callable[[Path, Path], Path]
    fragments: list[str] = field(default_factory=list)


def _truncate(at: Callable[[int], int]) -> Callable[[Path, Path], Path]:
    return _bytes(lambda raw: raw[: at(len(raw))])


FILE_CASES = [
    FileCase("not_hdf5", _bytes(lambda raw: b"this is a text file, not HDF5\n" * 20), ["cannot be opened as HDF5"]),
    FileCase("empty_file", _bytes(lambda raw: b""), ["cannot be opened as HDF5"]),
    FileCase("truncated_8", _truncate(lambda n: 8), ["cannot be opened as HDF5"]),
    FileCase("truncated_512", _truncate(lambda n: 512), ["cannot be opened as HDF5"]),
    FileCase("truncated_half", _truncate(lambda n: n // 2), ["cannot be opened as HDF5"]),
    FileCase("truncated_last_byte", _truncate(lambda n: n - 1), ["cannot be opened as HDF5"]),
    FileCase("kspace_real", _with("kspace", lambda k: k.real.astype(np.float32)), ["'kspace'", "complex"]),
    FileCase("kspace_int16", _with("kspace", lambda k: (k.real * 1000).astype(np.int16)), ["'kspace'", "complex"]),
    FileCase("kspace_rank2", _with("kspace", lambda k: k[0, 0]), ["'kspace'", "rank"]),
    FileCase("kspace_rank5", _with("kspace", lambda k: k[None]), ["'kspace'", "rank"]),
    FileCase("kspace_group", lambda s, d: _rewrite(s, d, drop=("kspace",), create=lambda hf: hf.create_group("kspace")),
             ["'kspace'", "group"]),
    FileCase("kspace_missing", lambda s, d: _rewrite(s, d, drop=("kspace",)), ["'kspace'", "missing"]),
    FileCase("kspace_no_slices", lambda s, d: _rewrite(s, d, replace={"kspace": _read(s, "kspace")[:0]},
                                                       drop=("sens_maps", "reconstruction_rss")),
             ["'kspace'", "no slices"]),
    FileCase("kspace_nan", _with("kspace", lambda k: _set(k, (0, 1, 3, 4), np.nan)),
             ["(slice 0)", "'kspace'", "NaN or Inf"]),
    FileCase("kspace_inf", _with("kspace", lambda k: _set(k, (0, 2, 16, 16), np.inf)),
             ["(slice 0)", "'kspace'", "NaN or Inf"]),
    FileCase("kspace_all_zero_prospective", _with("kspace", np.zeros_like), ["(slice 0)", "'kspace'", "all zero"]),
    FileCase("kspace_corrupted_chunk", _corrupted_chunk, ["(slice 0)", "'kspace'", "cannot be read"]),
    FileCase("header_not_xml", lambda s, d: _rewrite(s, d, replace={"ismrmrd_header": np.bytes_(b"<ismrmrd<<junk")}),
             ["'ismrmrd_header'", "XML"]),
    FileCase("header_encodes_outside_matrix", _header_outside, ["'ismrmrd_header'", "outside the k-space width"]),
    FileCase("mask_all_zero", _prospective(np.zeros(W, np.float32)), ["'mask'", "all zero"]),
    FileCase("mask_wrong_length", _prospective(np.ones(W - 7, np.float32)), ["'mask'", "does not fit"]),
    FileCase("mask_not_binary", _prospective(np.full(W, 2.0, np.float32)), ["'mask'", "0 and 1"]),
    FileCase("sens_maps_wrong_coils", _with("sens_maps", lambda m: m[:, :3]), ["'sens_maps'", "k-space shape"]),
    FileCase("sens_maps_real", _with("sens_maps", lambda m: m.real), ["'sens_maps'", "k-space shape"]),
    FileCase("sens_maps_nan", _with("sens_maps", lambda m: _set(m, (0, 0, 5, 5), np.nan)),
             ["(slice 0)", "'sens_maps'", "NaN or Inf"]),
    FileCase("target_wrong_rank", _with("reconstruction_rss", lambda t: t[..., None]),
             ["'reconstruction_rss'", "real volume"]),
    FileCase("target_inf", _with("reconstruction_rss", lambda t: _set(t, (0, 3, 3), np.inf)),
             ["(slice 0)", "'reconstruction_rss'", "NaN or Inf"]),
    FileCase("matrix_1x1", lambda s, d: _rewrite(s, d, replace={"kspace": _read(s, "kspace")[:, :, :1, :1]},
                                                 drop=("sens_maps", "reconstruction_rss", "ismrmrd_header")),
             ["'kspace'", "1 x 1 matrix"]),
    FileCase("zero_coils", lambda s, d: _rewrite(s, d, replace={"kspace": _read(s, "kspace")[:, :0]},
                                                 drop=("sens_maps",)),
             ["'kspace'", "0 coils"]),
    FileCase("declared_huge_matrix", _declared("kspace", (1, COILS, 200_000, 200_000), np.complex64, (1, 1, 64, 64)),
             ["'kspace'", "200000 x 200000"]),
    FileCase("declared_huge_slice_count", _declared("kspace", (10**7, COILS, H, W), np.complex64, (1, COILS, H, W)),
             ["'kspace'", "10000000 slices"]),
    FileCase("declared_huge_target", _declared("reconstruction_rss", (1, 100_000, 100_000), np.float32, (1, 64, 64)),
             ["'reconstruction_rss'", "100000, 100000"]),
    FileCase("declared_huge_mask", _declared("mask", (100_000, 100_000), np.float32, (64, 64)),
             ["'mask'", "does not fit"]),
    FileCase("attribute_max_text", lambda s, d: _rewrite(s, d, attrs={"max": "abc"}), ["attribute 'max'", "'abc'"]),
    FileCase("attribute_max_nan", lambda s, d: _rewrite(s, d, attrs={"max": np.nan}), ["attribute 'max'", "nan"]),
    FileCase("attribute_noise_sigma_negative", lambda s, d: _rewrite(s, d, attrs={"noise_sigma": -1.0}),
             ["attribute 'noise_sigma'", "-1.0"]),
]


@pytest.mark.parametrize("script", ["adapt", "reconstruct"])
@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_corrupted_h5_file(case, script, valid, tiny_prior, tmp_path, capfd):
    data = tmp_path / "in"
    data.mkdir()
    path = case.build(valid, data / f"{case.id}.h5")
    out = tmp_path / "out"
    _assert_refused(script, _argv(script, path, out, tiny_prior), capfd, out, [str(path), *case.fragments], data)


def _folder_without_h5(valid: Path, folder: Path) -> tuple[Path, list[str]]:
    (folder / "notes.txt").write_text("no data here\n")
    return folder, [str(folder), "no .h5 files"]


def _folder_with_a_folder_named_h5(valid: Path, folder: Path) -> tuple[Path, list[str]]:
    (folder / "scan.h5").mkdir()
    return folder, [str(folder / "scan.h5"), "is a folder"]


@pytest.mark.parametrize("script", ["adapt", "reconstruct"])
@pytest.mark.parametrize("build", [_folder_without_h5, _folder_with_a_folder_named_h5],
                         ids=["no_h5_files", "folder_named_h5"])
def test_bad_data_folder(build, script, valid, tiny_prior, tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    data, fragments = build(valid, folder)
    out = tmp_path / "out"
    _assert_refused(script, _argv(script, data, out, tiny_prior), capfd, out, fragments, folder)


@pytest.mark.parametrize("script", ["adapt", "reconstruct"])
def test_nan_in_the_second_file_of_a_folder(script, valid, tiny_prior, tmp_path, capfd):
    """Values are checked when a slice is read: a.h5 is fine and reconstructed, b.h5's slice holds a NaN.
    Volumes are the unit of work (finished volumes are kept for a rerun), so a.h5's outputs may exist;
    nothing of b.h5, no summary and no temporary file may be written."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(valid, folder / "a.h5")
    bad = _with("kspace", lambda k: _set(k, (0, 0, 0, 0), np.nan))(valid, folder / "b.h5")
    before = _snapshot(folder)
    out = tmp_path / "out"
    argv = _argv(script, folder, out, tiny_prior, ("methods=[unadapted]",) if script == "adapt" else ())
    argv[argv.index("--max-slices") + 1] = "2"
    capfd.readouterr()
    code = MAINS[script](argv)
    err = capfd.readouterr().err
    assert code == 2, err
    _assert_one_line(err, [str(bad), "(slice 0)", "'kspace'", "NaN or Inf"])
    written = [p.relative_to(out) for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in written if p.name.startswith(("b.h5", "."))], written
    assert not [p for p in written if p.name in ("metrics.json", "config.yaml", "profile.json")], written
    assert _snapshot(folder) == before


def _flip_bytes(raw: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    damaged = bytearray(raw)
    lo, hi = rng.choice([(0, 2048), (0, len(raw))])  # HDF5 metadata lives near the start
    for _ in range(rng.choice([1, 4, 16])):
        damaged[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(damaged)


FUZZ_SEEDS = range(40)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # damaged but finite targets overflow in SSIM
def test_byte_flip_fuzz(valid, tiny_prior, tmp_path, capfd):
    """Random byte damage: every run ends normally (exit 0) or with the one-line refusal (exit 2), never a traceback."""
    raw = valid.read_bytes()
    outcomes = {0: 0, 2: 0}
    for seed in FUZZ_SEEDS:
        data = tmp_path / f"in{seed}"
        data.mkdir()
        path = data / f"flip{seed}.h5"
        path.write_bytes(_flip_bytes(raw, seed))
        out = tmp_path / f"out{seed}"
        capfd.readouterr()
        code = reconstruct.main(_argv("reconstruct", path, out, tiny_prior))
        err = capfd.readouterr().err
        assert code in (0, 2), (seed, err)
        assert "Traceback" not in err, (seed, err)
        assert path.read_bytes() == _flip_bytes(raw, seed), seed
        outcomes[code] += 1
        if code == 2:
            _assert_one_line(err, [str(path)])
            assert not out.exists(), seed
            # the same file through adapt: the same refusal (it reads files the same way)
            _assert_refused("adapt", _argv("adapt", path, out, tiny_prior), capfd, out, [str(path)], data)
    assert outcomes[0] and outcomes[2], outcomes  # the seeds exercise both outcomes


# --------------------------------------------------------------------------------------------
# malformed YAML: the adapt config (--config) and site files (--site path.yaml)
# --------------------------------------------------------------------------------------------


@dataclass
class YamlCase:
    id: str
    text: str | bytes
    fragments: list[str]
    marks: tuple = ()


CONFIG_CASES = [
    YamlCase("unclosed_bracket", "biasrecon:\n  num_steps: [2\n", ["YAML"]),
    YamlCase("tab_indent", "biasrecon:\n\tnum_steps: 2\n", ["YAML"]),
    YamlCase("not_utf8", b"\xff\xfe\x00garbage\x80\n", ["YAML"]),
    YamlCase("duplicate_key", "mode: scan\nmode: site\n", ["YAML"]),
    YamlCase("unknown_key", "biasrecon:\n  nope: 1\n", ["biasrecon.nope"]),
    YamlCase("wrong_type", "biasrecon:\n  num_steps: many\n", ["biasrecon.num_steps"]),
    YamlCase("null_section", "biasrecon: null\n", ["'biasrecon'"]),
    YamlCase("invalid_mode", "mode: sometimes\n", ["'mode'"]),
    YamlCase("top_level_list", "- biasrecon\n- calibration\n", []),
    YamlCase("section_is_a_number", "biasrecon: 3\n", ["biasrecon"]),
    YamlCase("negative_num_steps", "biasrecon:\n  num_steps: -1\n", ["num_steps"]),
    YamlCase("unresolvable_interpolation", "biasrecon:\n  lam: ${nope}\n", ["biasrecon.lam"]),
]


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture
def data_dir(valid, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(valid, folder / "valid.h5")
    return folder


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CONFIG_CASES])
def test_malformed_adapt_config(case, data_dir, tiny_prior, tmp_path, capfd):
    config = _write(tmp_path / "config.yaml", case.text)
    out = tmp_path / "out"
    argv = ["--site", "fastmri_brain", "--data", str(data_dir / "valid.h5"), "--out", str(out), "--max-slices", "1",
            "--prior", str(tiny_prior), "--config", str(config), *ADAPT_SITE]
    _assert_refused("adapt", argv, capfd, out, [str(config), *case.fragments], data_dir)


@pytest.mark.parametrize("which", ["missing", "folder"])
def test_config_path_is_not_a_file(which, data_dir, tiny_prior, tmp_path, capfd):
    config = tmp_path / "absent.yaml" if which == "missing" else tmp_path
    out = tmp_path / "out"
    argv = ["--site", "fastmri_brain", "--data", str(data_dir / "valid.h5"), "--out", str(out),
            "--prior", str(tiny_prior), "--config", str(config)]
    _assert_refused("adapt", argv, capfd, out, [str(config), "--config"], data_dir)


SITE_CASES = [
    YamlCase("unclosed_bracket", "acquisition:\n  matrix: [1\n", ["YAML"]),
    YamlCase("not_utf8", b"\xff\xfe\x00garbage\x80\n", ["YAML"]),
    YamlCase("top_level_list", "- acquisition\n- noise\n", ["YAML list"]),
    YamlCase("single_value", "42\n", ["single YAML value"]),
    YamlCase("unknown_key", "acquisition:\n  nope: 1\n", ["acquisition.nope"]),
    YamlCase("wrong_type", "acquisition:\n  acceleration: fast\n", ["acquisition.acceleration", "Float"]),
    YamlCase("section_is_a_number", "acquisition: 3\n", ["acquisition", "AcquisitionConfig"]),
    YamlCase("unresolvable_interpolation", "acquisition:\n  acceleration: ${nope}\n",
             ["acquisition.acceleration", "nope"]),
    YamlCase("invalid_value", "acquisition:\n  acceleration: -1\n", ["acquisition.acceleration", "> 1"]),
    YamlCase("unknown_source", "data:\n  source: ftp\n", ["data.source", "'ftp'"]),
]


@pytest.mark.parametrize("script", ["adapt", "reconstruct"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in SITE_CASES])
def test_malformed_site_yaml(case, script, data_dir, tiny_prior, tmp_path, capfd):
    site = _write(tmp_path / "my_site.yaml", case.text)
    out = tmp_path / "out"
    argv = _argv(script, data_dir / "valid.h5", out, tiny_prior, site=str(site))
    _assert_refused(script, argv, capfd, out, [str(site), *case.fragments], data_dir)


@pytest.mark.parametrize("script", ["adapt", "reconstruct"])
@pytest.mark.parametrize("which", ["missing", "folder"])
def test_site_path_is_not_a_file(which, script, data_dir, tiny_prior, tmp_path, capfd):
    site = tmp_path / "absent.yaml"
    if which == "folder":
        site.mkdir()
    out = tmp_path / "out"
    argv = _argv(script, data_dir / "valid.h5", out, tiny_prior, site=str(site))
    _assert_refused(script, argv, capfd, out, [str(site), "not found"], data_dir)


# --------------------------------------------------------------------------------------------
# malformed dotlists
# --------------------------------------------------------------------------------------------


ADAPT_DOTLISTS = [
    pytest.param(["a.b"], ["command line", "'a.b'", "key=value"], id="no_equals"),
    pytest.param(["=3"], ["command line", "'=3'", "key=value"], id="empty_key"),
    pytest.param(["biasrecon.nope=1"], ["command line", "biasrecon.nope"], id="unknown_key"),
    pytest.param(["nope=1"], ["command line", "'nope'"], id="unknown_top_key"),
    pytest.param(["biasrecon.num_steps=abc"], ["command line", "biasrecon.num_steps"], id="wrong_type"),
    pytest.param(["biasrecon.lam_grid=[0.1"], ["command line", "biasrecon.lam_grid"], id="unclosed_list"),
    pytest.param(["methods=[magic]"], ["with overrides", "'methods'", "magic"], id="unknown_method"),
    pytest.param(["batch_size=0"], ["with overrides", "'batch_size'"], id="zero_batch"),
    pytest.param(["site.nope=1"], ["override key 'nope'"], id="site_unknown_key"),
    pytest.param(["site.acquisition.acceleration=abc"], ["acquisition.acceleration", "Float"], id="site_wrong_type"),
    pytest.param(["site.=3"], ["command line", "key=value"], id="site_empty_key"),
    pytest.param(["site.acquisition.acceleration=${nope}"], ["acquisition.acceleration", "nope"],
                 id="site_interpolation"),
    pytest.param(["--max-slices", "0"], ["command line", "--max-slices"], id="max_slices_zero"),
    pytest.param(["--max-slices", "abc"], ["command line", "--max-slices"], id="max_slices_text"),
    pytest.param(["biasrecon.num_steps=-1"], ["command line", "num_steps"], id="negative_num_steps"),
    pytest.param(["calibration.bands=0"], ["command line", "calibration.bands"], id="zero_bands"),
    pytest.param(["biasrecon.lam=${nope}"], ["command line", "biasrecon.lam"], id="interpolation"),
    pytest.param(["biasrecon.lr=nan"], ["command line", "biasrecon.lr"], id="nan_lr"),
    pytest.param(["biasrecon.eta=-5"], ["command line", "biasrecon.eta"], id="negative_eta"),
    pytest.param(["biasrecon.adapt_fraction=2"], ["command line", "adapt_fraction"], id="adapt_fraction_2"),
    pytest.param(["biasrecon.sigma_start=inf", "methods=[unadapted]"], ["command line", "sigma_start"],
                 id="infinite_sigma_start"),
    pytest.param(["biasrecon.noise_sigma=nan", "methods=[unadapted_sure]"], ["command line", "noise_sigma"],
                 id="nan_noise_sigma"),
]


@pytest.mark.parametrize(("items", "fragments"), ADAPT_DOTLISTS)
def test_malformed_adapt_dotlist(items, fragments, data_dir, tiny_prior, tmp_path, capfd):
    out = tmp_path / "out"
    argv = _argv("adapt", data_dir / "valid.h5", out, tiny_prior, tuple(items))
    _assert_refused("adapt", argv, capfd, out, fragments, data_dir)


RECONSTRUCT_DOTLISTS = [
    pytest.param(["a.b"], ["command line", "'a.b'", "key=value"], id="no_equals"),
    pytest.param(["=3"], ["command line", "'=3'", "key=value"], id="empty_key"),
    pytest.param(["nope=1"], ["override key 'nope'"], id="unknown_key"),
    pytest.param(["acquisition.acceleration=abc"], ["acquisition.acceleration", "Float"], id="wrong_type"),
    pytest.param(["acquisition.acceleration=-1"], ["acquisition.acceleration", "> 1"], id="invalid_value"),
    pytest.param(["acquisition=3"], ["override key 'acquisition'"], id="section_is_a_number"),
    pytest.param(["acquisition.acceleration=${nope}"], ["acquisition.acceleration", "nope"], id="interpolation"),
    pytest.param(["acquisition.matrix=[1"], ["acquisition.matrix"], id="unclosed_list"),
    pytest.param(["--param", "tv.max_iter=abc", "--method", "tv"], ["command line", "max_iter", "'abc'"], id="bad_param"),
    pytest.param(["--grid", "nan", "--method", "tv", "--tune"], ["command line", "--grid"], id="nan_grid"),
]


@pytest.mark.parametrize(("items", "fragments"), RECONSTRUCT_DOTLISTS)
def test_malformed_reconstruct_dotlist(items, fragments, data_dir, tmp_path, capfd):
    out = tmp_path / "out"
    argv = _argv("reconstruct", data_dir / "valid.h5", out, Path(), tuple(items))
    _assert_refused("reconstruct", argv, capfd, out, fragments, data_dir)


# --------------------------------------------------------------------------------------------
# checkpoints: pickles are refused, never unpickled
# --------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates ``path`` (an unpickled checkpoint would run code; this one only leaves a mark)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in ScoreModel.from_config(TINY_NETWORK).state_dict().items()}


def _with_config(path: Path, change: Callable[[dict], None]) -> Path:
    config = prior_config_to_dict(PriorConfig(network=TINY_NETWORK))
    change(config)
    save_file(_tiny_state(), str(path), metadata={"format": json.dumps("biasrecon-score/1"),
                                                  "config": json.dumps(config)})
    return path


def _truncated(path: Path, prior: Path) -> Path:
    raw = prior.read_bytes()
    return _write(path, raw[: len(raw) // 2])


# name: (build(path, trap, valid_prior) -> checkpoint path, fragments of the error line)
CHECKPOINTS = {
    "torch_save_zip": (lambda p, trap, _: torch.save({"model": _Trap(trap)}, p) or p, ["pickle"]),
    "torch_save_legacy": (lambda p, trap, _: torch.save({"model": _Trap(trap)}, p,
                                                        _use_new_zipfile_serialization=False) or p, ["pickle"]),
    "raw_pickle": (lambda p, trap, _: _write(p, pickle.dumps(_Trap(trap), protocol=4)), ["pickle"]),
    "pickle_protocol_0": (lambda p, trap, _: _write(p, pickle.dumps(_Trap(trap), protocol=0)), ["safetensors"]),
    "empty": (lambda p, trap, _: _write(p, b""), ["safetensors"]),
    "truncated_safetensors": (lambda p, trap, prior: _truncated(p, prior), ["safetensors"]),
    "no_metadata": (lambda p, trap, _: save_file({"w": torch.zeros(2)}, str(p)) or p, ["'format'"]),
    "declares_a_huge_network": (lambda p, trap, _: _with_config(p, lambda c: c["network"].update(base_channels=10**5)),
                                ["weight", "expects"]),
    "folder": (lambda p, trap, _: p.mkdir() or p, ["is a folder"]),
}


@pytest.mark.parametrize("script", ["adapt", "reconstruct"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_bad_prior_checkpoint(name, script, data_dir, tiny_prior, tmp_path, capfd):
    build, fragments = CHECKPOINTS[name]
    trap = tmp_path / "unpickled.txt"
    prior = build(tmp_path / "prior.pt", trap, tiny_prior)
    out = tmp_path / "out"
    argv = _argv(script, data_dir / "valid.h5", out, prior)
    if script == "reconstruct":  # the prior is used by the prior-based methods only
        argv += ["--method", "unadapted", "--prior", str(prior)]
    _assert_refused(script, argv, capfd, out, [str(prior), *fragments], data_dir)
    assert not trap.exists(), "the checkpoint was unpickled"


# --------------------------------------------------------------------------------------------
# real command lines: nothing but the one line reaches the terminal
# --------------------------------------------------------------------------------------------


def test_command_line_runs_print_one_line(valid, tiny_prior, tmp_path):
    """Two real processes, in parallel (about 5 s of imports each): a NaN slice through adapt.py and a
    corrupted compressed chunk (an error inside HDF5's C library) through reconstruct.py."""
    data = tmp_path / "in"
    data.mkdir()
    nan = FILE_CASES[[c.id for c in FILE_CASES].index("kspace_nan")].build(valid, data / "nan.h5")
    chunk = _corrupted_chunk(valid, data / "chunk.h5")
    before = _snapshot(data)
    runs = [
        ([str(ADAPT), *_argv("adapt", nan, tmp_path / "out1", tiny_prior)], [str(nan), "NaN or Inf"],
         tmp_path / "out1"),
        ([str(RECONSTRUCT), *_argv("reconstruct", chunk, tmp_path / "out2", tiny_prior)],
         [str(chunk), "'kspace'", "cannot be read"], tmp_path / "out2"),
    ]
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path) for argv, _, _ in runs]
    for proc, (_, fragments, out) in zip(procs, runs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        _assert_one_line(stderr, fragments)
        assert stdout == "", stdout
        assert not out.exists()
    assert _snapshot(data) == before
