"""Running a job over many volumes: ranks under torchrun, resumable per-volume records, signals.

A job (``scripts/adapt.py``, ``scripts/reconstruct.py``) reconstructs volumes one by one. Under
``torchrun`` each rank takes the volumes ``v`` with ``v % world_size == rank`` (in dataset order),
so the union of the ranks' outputs is the single-process output. After a volume's outputs are
written (each atomically), its *record* — a small JSON with the job's config hash and the
volume's facts — is written last: it marks the volume done. A rerun with the same config hash
skips volumes whose record and outputs exist and redoes the others. SIGTERM and SIGINT raise
:class:`Interrupted` inside the computation, so atomic writers remove their temporary files and no
partial file is left.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from recon.atomic import write_text
from recon.data.fastmri_io import write_reconstructions
from recon.errors import InputError

__all__ = [
    "Ranks",
    "init_ranks",
    "config_hash",
    "volume_hash",
    "VolumesDone",
    "run_volumes",
    "read_record",
    "write_record",
    "Interrupted",
    "interruptible",
    "OneLineParser",
    "check_output_folder",
    "is_inside",
    "run_main",
]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (``world_size == 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, volume_number: int) -> bool:
        """Whether this rank reconstructs the ``volume_number``-th volume (0-based, dataset order)."""
        return volume_number % self.world_size == self.rank

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without torchrun."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_ranks(device: torch.device | None = None) -> Ranks:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA).

    Shape: none. On CUDA each rank uses ``cuda:LOCAL_RANK`` (set as the current device).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Ranks(rank, world_size, local_rank)


def config_hash(payload: Any) -> str:
    """sha256 (first 16 hex digits) of ``payload`` as canonical JSON (sorted keys; non-JSON values as str)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def volume_hash(settings: dict, path: Path, slices: Sequence[int]) -> str:
    """Config hash of one volume's outputs: the run's ``settings``, the input file's identity (name,
    size, mtime) and the slice indices reconstructed."""
    stat = Path(path).stat()
    return config_hash({**settings, "file": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "slices": [int(i) for i in slices]})


def read_record(path: Path, expected_hash: str, outputs: Sequence[Path]) -> dict | None:
    """The record of a finished volume, or ``None`` when it must be (re)done.

    A volume is done when its record exists, parses, carries ``expected_hash`` and every path in
    ``outputs`` exists.
    """
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config_hash") != expected_hash:
        return None
    if not all(p.is_file() for p in outputs):
        return None
    return record


def write_record(path: Path, record: dict) -> None:
    """Write a volume's record atomically (after its outputs: the record marks the volume done)."""
    write_text(path, json.dumps(record, indent=1, sort_keys=True, default=float) + "\n")


@dataclass
class VolumesDone:
    """What :func:`run_volumes` returns on rank 0.

    Attributes:
        records: every volume's record, in dataset order (computed now or read back).
        skipped: slices whose volume an earlier run had finished with the same config hash.
        timings: the ``compute`` timings of the volumes computed now, over all ranks.
    """

    records: list[dict]
    skipped: int
    timings: list[float]


def run_volumes(ranks: Ranks, volumes: Sequence[tuple[Path, Sequence[int]]], settings: dict, out: Path,
                methods: Sequence[str],
                compute: Callable[[int], tuple[dict[str, np.ndarray], dict, list[float]]],
                extra_outputs: Callable[[int], Sequence[Path]] | None = None) -> VolumesDone | None:
    """This rank's share of the volumes, each skipped when done, else computed, written and recorded.

    ``volumes[k]`` is ``(input path, slice indices)`` in dataset order; rank ``r`` takes ``k ≡ r mod N``.
    ``compute(k)`` returns ``({method: (slices, h, w) volume}, record facts, timings)``; the volumes are
    written as ``out/reconstructions/<method>/<file>`` (atomically), then the record
    ``out/records/<file>.json`` with the volume's config hash (:func:`volume_hash`) and ``file``.
    ``extra_outputs(k)``: files ``compute(k)`` writes itself (atomically), which a skipped volume must have too.

    Returns:
        On rank 0 every rank's records gathered (:class:`VolumesDone`); ``None`` on the other ranks.
    """
    local: list[tuple[int, dict]] = []
    skipped, timings = 0, []
    mine = [k for k in range(len(volumes)) if ranks.owns(k)]
    for k in tqdm(mine, desc="volumes", unit="volume", disable=None if ranks.is_main else True):
        path, slices = volumes[k]
        digest = volume_hash(settings, path, slices)
        outputs = {m: out / "reconstructions" / m / path.name for m in methods}
        record_path = out / "records" / f"{path.name}.json"
        extra = list(extra_outputs(k)) if extra_outputs is not None else []
        record = read_record(record_path, digest, [*outputs.values(), *extra])
        if record is None:
            images, facts, spent = compute(k)
            for method, volume in images.items():
                write_reconstructions(outputs[method].parent, path.name, volume)
            record = {"config_hash": digest, "file": path.name, **facts}
            write_record(record_path, record)
            timings.extend(spent)
        else:
            skipped += len(slices)
        local.append((k, record))
    gathered = ranks.all_gather((local, skipped, timings))
    if not ranks.is_main:
        return None
    ordered = sorted((pair for part, _, _ in gathered for pair in part), key=lambda pair: pair[0])
    return VolumesDone([r for _, r in ordered], sum(g[1] for g in gathered), [t for g in gathered for t in g[2]])


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; ``signum`` says which (exit code ``128 + signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` raised in the main thread; restore the
    previous handlers on exit. A BaseException, so ``except Exception`` blocks let it through and
    atomic writers clean up their temporary files."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error:`` line (an :class:`InputError`, exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"command line: {message}.")


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (after resolving links)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_folder(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that is a file or lies inside an input folder.

    Raises:
        InputError: naming ``--out`` and the input folder.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: key '--out' is a file, expected an output folder.")
    for data in inputs:
        folder = data if data.is_dir() else data.parent
        if is_inside(out, folder):
            raise InputError(
                f"{out}: key '--out' lies in the input data folder {folder.resolve()}, expected a separate folder."
            )


def run_main(run: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
             input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """A script's entry point: ``run(argv)``'s exit code, or 2 with one ``error:`` line on bad input
    (:class:`InputError`, an omegaconf error, and ``input_errors`` such as a checkpoint's), or
    ``128 + signal`` after SIGTERM / SIGINT (the finished volumes kept for a rerun to skip)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        with interruptible():
            return run(argv)
    except (InputError, *input_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        print(f"error: configuration: key '{key}' is invalid ({str(exc).strip().splitlines()[0]}).", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"{exc}: finished volumes are kept; rerun the same command to complete the set.", file=sys.stderr)
        return 128 + exc.signum
