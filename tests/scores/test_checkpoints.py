"""Checkpoints: safetensors round trip, refusal of pickles, of non-safetensors and of mismatched configs."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scores.checkpoints import CheckpointError, data_hash, load_checkpoint, read_metadata, save_checkpoint
from scores.config import NetworkConfig, PriorConfig, prior_config_to_dict
from scores.model import ScoreModel, complex_noise

NET = NetworkConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=True, emb_channels=16)


def _saved(tmp_path: Path) -> tuple[Path, ScoreModel, PriorConfig]:
    cfg = PriorConfig(network=NET)
    model = ScoreModel.from_config(NET, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = save_checkpoint(tmp_path / "prior.safetensors", model, {"config": cfg, "step": 12, "data_hash": "abc",
                                                                     "git_commit": "deadbeef"})
    return path, model, cfg


def test_round_trip_rebuilds_network_and_metadata(tmp_path: Path) -> None:
    path, model, cfg = _saved(tmp_path)
    loaded, meta = load_checkpoint(path)
    assert meta["config"] == cfg and meta["step"] == 12 and meta["data_hash"] == "abc"
    assert meta["git_commit"] == "deadbeef" and meta["torch_version"] == torch.__version__ and meta["created"]
    x = complex_noise((2, 1, 9, 7), torch.Generator().manual_seed(1))
    assert torch.equal(loaded.denoise(x, 0.3), model.eval().denoise(x, 0.3))
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["prior.safetensors"]  # atomic write leaves no temp file


def test_pickle_files_are_refused_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, _ = _saved(tmp_path)
    zipped, raw = tmp_path / "torch_save.pt", tmp_path / "raw.pkl"
    torch.save(model.state_dict(), zipped)
    raw.write_bytes(pickle.dumps({"weights": 1}))

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match=r"pickle.*expected a safetensors checkpoint"):
            load_checkpoint(path)


def test_other_bad_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(plain)


def _rewrite_config(path: Path, out: Path, **network_changes: object) -> None:
    meta = {k: json.dumps(v) for k, v in read_metadata(path).items()}
    cfg = json.loads(meta["config"])
    cfg["network"].update(network_changes)
    meta["config"] = json.dumps(cfg)
    save_file(load_file(str(path)), str(out), metadata=meta)


def test_config_that_does_not_match_weights_names_first_bad_key(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    wider = tmp_path / "wider.safetensors"
    _rewrite_config(path, wider, base_channels=16)
    with pytest.raises(CheckpointError, match=r"weight 'network\.[\w.]+' has shape .* but the network built"):
        load_checkpoint(wider)
    no_attention = tmp_path / "no_attention.safetensors"
    _rewrite_config(path, no_attention, attention=False)
    with pytest.raises(CheckpointError, match=r"weight 'network\.attention\.[\w.]+' is not part of"):
        load_checkpoint(no_attention)
    unknown = tmp_path / "unknown.safetensors"
    _rewrite_config(path, unknown, depth=3)
    with pytest.raises(CheckpointError, match="depth"):
        load_checkpoint(unknown)


def test_expected_network_config_must_match(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    load_checkpoint(path, network_config=NET)
    with pytest.raises(CheckpointError, match=r"'network\.num_res_blocks' is 1, expected 2"):
        load_checkpoint(path, network_config=dataclasses.replace(NET, num_res_blocks=2))


def test_data_hash_is_sha256_of_bytes() -> None:
    import hashlib

    x = complex_noise((2, 1, 3, 3), torch.Generator().manual_seed(0))
    assert data_hash(x) == hashlib.sha256(torch.view_as_real(x).numpy().tobytes()).hexdigest()
    y = x.clone()
    y[0, 0, 0, 0] += 1e-3
    assert data_hash(y) != data_hash(x)
    assert prior_config_to_dict(PriorConfig())["network"]["channel_mults"] == [1, 2, 2, 4]


def test_header_length_byte_like_pickle_opcode_still_loads(tmp_path: Path) -> None:
    """A safetensors header length whose first byte is 0x80 (pickle's PROTO opcode) is not mistaken for a pickle."""
    path, model, cfg = _saved(tmp_path)
    for pad in range(256):
        out = save_checkpoint(tmp_path / "padded.safetensors", model, {"config": cfg, "note": "x" * pad})
        if out.read_bytes()[0] == 0x80:
            break
    assert out.read_bytes()[0] == 0x80
    loaded, meta = load_checkpoint(out)
    assert meta["note"].startswith("x") and meta["config"] == cfg
