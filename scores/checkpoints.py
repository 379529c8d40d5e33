"""Checkpoints of the prior: safetensors weights plus JSON metadata; loading never unpickles.

A checkpoint file holds the (EMA) weights of a :class:`~scores.model.ScoreModel` under the keys of its
``state_dict`` and string metadata, each value JSON-encoded:

- ``format``: ``"biasrecon-score/1"``
- ``config``: the full :class:`~scores.config.PriorConfig` (the network is rebuilt from it)
- ``step``, ``data_hash`` (sha256 of the training images' bytes), ``git_commit``, ``created``,
  ``torch_version``, ``machine`` and any extra keys given by the caller.

The training state (raw weights, EMA weights, AdamW moments) for resuming is a second safetensors file
(:func:`save_training_state` / :func:`load_training_state`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import struct
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from scores.config import ConfigError, NetworkConfig, PriorConfig, prior_config_from_dict, prior_config_to_dict
from scores.model import ScoreModel

__all__ = [
    "CheckpointError",
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "warm_start",
    "save_training_state",
    "load_training_state",
    "data_hash",
]

FORMAT = "biasrecon-score/1"
_STATE_FORMAT = "biasrecon-score-train-state/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (not safetensors, pickle, wrong format or mismatching weights)."""


def data_hash(images: Tensor) -> str:
    """sha256 hex digest of a tensor's raw bytes (C order, on CPU).

    Maths: ``sha256(bytes(images))``. Shape: any; complex64 ``(N, 1, H, W)`` for training images.
    """
    t = images.detach().to("cpu").contiguous()
    if torch.is_complex(t):
        t = torch.view_as_real(t)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; use the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_safetensors(path: Path) -> None:
    """Refuse missing files, pickles / zip archives (torch.save) and anything without a safetensors header."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "file not found"
        raise CheckpointError(f"{path}: {what}, expected a safetensors checkpoint.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        ok = len(head) == 8
        if ok:
            (header_len,) = struct.unpack("<Q", head)
            ok = 2 <= header_len <= size - 8
            if ok:
                try:
                    header = json.loads(f.read(header_len))
                    ok = isinstance(header, dict)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    ok = False
    if ok:
        return
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: is a pickle/zip file (torch.save format), expected a safetensors checkpoint; "
            "pickles are never loaded because unpickling can run arbitrary code."
        )
    raise CheckpointError(f"{path}: is not a safetensors file (no valid header), expected a safetensors checkpoint.")


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: could not be read as safetensors ({exc}).") from None
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta


def _encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in metadata.items():
        if isinstance(value, PriorConfig):
            value = prior_config_to_dict(value)
        out[key] = json.dumps(value, sort_keys=True)
    return out


def _standard_metadata() -> dict[str, Any]:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "machine": f"{platform.node()} {platform.machine()} {platform.system()}",
    }


def save_checkpoint(path: str | Path, model: ScoreModel, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``metadata`` to a safetensors file, atomically.

    Maths: not applicable. Shape: not applicable.

    Args:
        path: destination ``.safetensors`` file.
        model: the ScoreModel whose ``state_dict`` is stored.
        metadata: must hold ``config`` (a PriorConfig or its dict); ``step``, ``data_hash`` and
            ``git_commit`` are recorded when given; ``created``, ``torch_version`` and ``machine`` are added.

    Returns:
        The written path.
    """
    if "config" not in metadata:
        raise ValueError("save_checkpoint needs metadata['config'] (the PriorConfig the network was built from).")
    meta = {"format": FORMAT, **_standard_metadata(), **metadata}
    path = Path(path)
    _atomic_save(dict(model.state_dict()), path, _encode_metadata(meta))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint (JSON-decoded), without building the network."""
    return _read(Path(path))[1]


def _first_config_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_config_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}"
    return None


def _check_weights(path: Path, tensors: dict[str, Tensor], expected: dict[str, Tensor], what: str) -> None:
    for key, value in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: weight '{key}' is missing; {what} expects it.")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: weight '{key}' has shape {tuple(tensors[key].shape)}, "
                f"but {what} expects {tuple(value.shape)}."
            )
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{path}: weight '{key}' is not part of {what}.")


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", network_config: NetworkConfig | None = None
) -> tuple[ScoreModel, dict[str, Any]]:
    """Rebuild a ScoreModel from a checkpoint's stored config and load its weights (no unpickling).

    Maths: not applicable. Shape: not applicable.

    Args:
        path: a file written by :func:`save_checkpoint`.
        device: where the model goes.
        network_config: when given, the stored ``network`` config must equal it.

    Returns:
        ``(model in eval mode, metadata)``; ``metadata["config"]`` is a :class:`PriorConfig`.

    Raises:
        CheckpointError: pickle/zip or non-safetensors file, missing or invalid config, a config that differs
            from ``network_config``, or weights whose names or shapes do not match the network.
    """
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata key 'format' is {meta.get('format')!r}, expected {FORMAT!r}.")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: metadata key 'config' is missing, expected the prior config.")
    try:
        cfg = prior_config_from_dict(meta["config"], source=f"{path} metadata 'config'")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if network_config is not None:
        stored, wanted = dataclasses.asdict(cfg.network), dataclasses.asdict(network_config)
        diff = _first_config_difference(stored, wanted)
        if diff is not None:
            raise CheckpointError(
                f"{path}: config key 'network.{diff}' is {stored.get(diff)!r}, expected {wanted.get(diff)!r}."
            )
    # shapes first, on the meta device (no memory): a config declaring an absurdly large network is
    # refused by the weight check instead of allocating it
    try:
        with torch.device("meta"):
            skeleton = ScoreModel.from_config(cfg.network)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: metadata key 'config' does not build a network ({reason}).") from None
    _check_weights(path, tensors, skeleton.state_dict(), "the network built from its config")
    model = ScoreModel.from_config(cfg.network)
    model.load_state_dict(tensors, strict=True)
    meta["config"] = cfg
    return model.to(device).eval(), meta


def warm_start(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Initialise ``model`` with the weights of another prior's checkpoint (fine-tuning from it).

    Every weight of ``model`` must exist in the checkpoint with the same shape; weights the checkpoint
    has beyond them (for example the self-attention of a prior whose successor is fully convolutional)
    are dropped and named in the returned facts.

    Returns:
        Provenance for the new checkpoint's metadata: ``init_sha256`` (of the file), ``init_step``,
        ``init_data_source``, ``init_dropped`` (names of unused weights).

    Raises:
        CheckpointError: an unreadable checkpoint, or a weight of ``model`` it lacks or holds in another shape.
    """
    path = Path(path)
    source, meta = load_checkpoint(path)
    weights = source.state_dict()
    wanted = model.state_dict()
    for name, value in wanted.items():
        if name not in weights or tuple(weights[name].shape) != tuple(value.shape):
            got = "missing" if name not in weights else f"of shape {tuple(weights[name].shape)}"
            raise CheckpointError(
                f"{path}: weight '{name}' is {got}, expected shape {tuple(value.shape)} to initialise the network "
                f"(train.init_from must name a prior of the same architecture)."
            )
    model.load_state_dict({name: weights[name] for name in wanted}, strict=True)
    return {
        "init_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "init_step": meta.get("step"),
        "init_data_source": meta.get("data_source", ""),
        "init_dropped": sorted(set(weights) - set(wanted)),
    }


def save_training_state(
    path: str | Path,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    metadata: dict[str, Any],
) -> Path:
    """Write raw weights, EMA weights and optimizer moments (safetensors, atomic) for exact resume.

    Keys: ``model.<name>``, ``ema.<name>``, ``optim.<param index>.<state name>``.
    """
    tensors: dict[str, Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    meta = {"format": _STATE_FORMAT, **_standard_metadata(), **metadata}
    path = Path(path)
    _atomic_save(tensors, path, _encode_metadata(meta))
    return path


def load_training_state(
    path: str | Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a file written by :func:`save_training_state` into freshly built objects; returns its metadata."""
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{path}: metadata key 'format' is {meta.get('format')!r}, expected {_STATE_FORMAT!r}.")
    parts: dict[str, dict[str, Tensor]] = {"model": {}, "ema": {}}
    optim_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
        elif head == "optim":
            index, _, name = rest.partition(".")
            optim_state.setdefault(int(index), {})[name] = value
        else:
            raise CheckpointError(f"{path}: tensor '{key}' is not part of a training state.")
    for name, module in (("model", model), ("ema", ema)):
        expected = module.state_dict()
        _check_weights(path, parts[name], expected, f"the {name} network")
        module.load_state_dict(parts[name], strict=True)
    device = next(model.parameters()).device
    fresh = optimizer.state_dict()
    for index, state in optim_state.items():
        for name, value in state.items():
            if name != "step":
                state[name] = value.to(device)
    optimizer.load_state_dict({"state": optim_state, "param_groups": fresh["param_groups"]})
    return meta
