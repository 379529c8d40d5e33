"""Reconstruct a site's slices with one or more methods; write fastMRI-format results and metrics.

Usage::

    python scripts/reconstruct.py --site unseen_center --method all --out DIR
        [--data PATH] [--max-slices N] [--tune] [--grid 1e-3,3e-3,1e-2] [--oracle-maps]
        [--param tv.max_iter=100 ...] [--seed S] [key=value ...]

Data: ``--data PATH`` (a fastMRI-format h5 file or folder) if given; otherwise the site's own
data: a fastMRI site reads ``data.root``, a simulated site is simulated (once, cached) into
``DIR/data/<site>-seed<S>``. Fully sampled files are undersampled with the site's acquisition
(mask type, acceleration, centre fraction, mask seed); ``key=value`` items override the site.

Methods: ``--method`` is a name, a comma list, or ``all`` (the classical methods zero_filled,
sense, l1wavelet, tv; see :mod:`recon.baselines`), plus the prior-based ``unadapted`` (fixed λ) and
``unadapted_sure`` (λ by SURE) with the score prior of ``--prior`` (default: the bundled one). Sensitivity maps are ESPIRiT from each slice's
auto-calibration centre, computed once per slice and shared by every method, or the file's true
maps with ``--oracle-maps`` (simulated sites; an upper bound). ``--param METHOD.KEY=VALUE`` sets a
method's parameter; ``--tune`` picks λ of l1wavelet / tv on a grid by the best mean PSNR on the
very slices being reconstructed (the "best-tuned" baseline; needs targets, keeps the slices in
memory) and records the table in ``DIR/tuning.json``.

``--max-slices N`` reconstructs the first N slices in dataset order (files sorted by name, slices
in order); a file cut short gets a volume of its first slices only.

Volumes are the unit of work: under ``torchrun --nproc_per_node=N`` rank ``r`` takes the volumes
``v`` with ``v % N == r`` (dataset order; the union equals a single-process run; ``--tune`` needs
one process). Each volume's reconstructions are written (atomically) when its slices are done,
then its record ``DIR/records/<file>.json``; a rerun skips volumes whose record carries the same
config hash (methods, parameters incl. the tuned λ and the prior's sha256, site, maps, the input
file's size, mtime and slices) and redoes the others. SIGTERM / SIGINT stop the run with exit
code 128 + signal and no partial file; the same command completes the set.

Outputs (each file atomically):

* ``DIR/reconstructions/METHOD/<input file name>.h5``: dataset ``reconstruction``
  ``(slices, h, w)`` float32 magnitude on the file's raw scale, centre-cropped to the target's
  size when the file has a target, else to the header's ``reconSpace`` (fastMRI's submission
  format, scored by ``fastmri.evaluate``).
* ``DIR/metrics.json`` when targets exist: ``{method: {"psnr", "ssim", "nmse",
  "seconds_per_slice"}}``, fastMRI's volume-wise metrics averaged over volumes;
  ``seconds_per_slice`` is the mean wall time of the method (sensitivity maps excluded, reported
  on stdout).

Bad input: ``error: <message>`` on stderr, exit code 2; arguments, site and the files' structure
are checked before anything is written, and a bad value found while reading a slice stops the run
before that volume is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import xml.etree.ElementTree as etree
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from recon.atomic import write_text  # noqa: E402
from recon.baselines import (  # noqa: E402
    CLASSICAL_METHODS,
    DEFAULT_LAMBDA_GRID,
    METHODS,
    PRIOR_METHODS,
    TUNABLE_METHODS,
    center_crop,
    check_params,
    method_parameters,
    run_baseline,
    sensitivity_maps,
    tune_lambda,
)
from recon.data import FastMRISliceDataset, Sample, load_site, site_dataset  # noqa: E402
from scores.checkpoints import CheckpointError, load_checkpoint  # noqa: E402

DEFAULT_PRIOR = Path(__file__).resolve().parents[1] / "scores" / "weights" / "source_brain.safetensors"
from recon.data.fastmri_io import ISMRMRD_NAMESPACE, VolumeInfo  # noqa: E402
from recon.data.sites import SiteConfig  # noqa: E402
from recon.errors import InputError  # noqa: E402
from recon.jobs import (  # noqa: E402
    Interrupted,
    OneLineParser,
    Ranks,
    check_output_folder,
    file_sha256,
    init_ranks,
    interruptible,
    run_volumes,
)
from recon.metrics import evaluate  # noqa: E402
from recon.operators import Sense  # noqa: E402

METRIC_KEYS = ("psnr", "ssim", "nmse")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, help="site name in configs/sites or a .yaml path")
    parser.add_argument("--method", default="all", help="a method, a comma list, or 'all' (classical methods)")
    parser.add_argument("--data", type=Path, help="fastMRI-format h5 file or folder (default: the site's data)")
    parser.add_argument("--max-slices", type=int, help="reconstruct only the first N slices")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--tune", action="store_true", help="grid-search λ of l1wavelet/tv on the same slices")
    default_grid = ",".join(map(str, DEFAULT_LAMBDA_GRID))
    parser.add_argument("--grid", help=f"comma list of λ for --tune (default {default_grid})")
    parser.add_argument("--oracle-maps", action="store_true", help="use the file's true sensitivity maps")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method parameter, e.g. tv.max_iter=100 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed of a simulated site")
    parser.add_argument("--prior", type=Path, default=DEFAULT_PRIOR,
                        help="score-prior checkpoint for unadapted / unadapted_sure (default: the bundled one)")
    parser.add_argument("overrides", nargs="*", help="site overrides, e.g. acquisition.acceleration=8")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# argument checks (all before anything is written)
# --------------------------------------------------------------------------------------------


def parse_methods(text: str) -> list[str]:
    """``all`` → the classical methods; otherwise a comma list of registered methods, in order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(CLASSICAL_METHODS)
    if not names:
        raise InputError("command line: key '--method' is empty, expected a method, a comma list or 'all'.")
    for name in names:
        if name not in METHODS:
            raise InputError(
                f"command line: key '--method' names {name!r}, expected 'all' or one of {', '.join(METHODS)}."
            )
    return list(dict.fromkeys(names))


def parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` items → ``{method: {key: value}}`` (values read as YAML scalars)."""
    params: dict[str, dict] = {m: {} for m in methods}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise InputError(
                f"command line: key '--param {item}' is malformed, expected METHOD.KEY=VALUE like tv.lam=0.01."
            )
        if method not in params:
            raise InputError(
                f"command line: key '--param {item}' names method {method!r}, expected one of the methods run "
                f"({', '.join(methods)})."
            )
        if name not in method_parameters(method):
            allowed = ", ".join(method_parameters(method)) or "(none)"
            raise InputError(
                f"command line: key '--param {item}' is not a parameter of {method}, expected one of {allowed}."
            )
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
        except Exception:  # omegaconf/yaml errors come in many types
            raise InputError(
                f"command line: key '--param {item}' has an unreadable value, expected a number or word."
            ) from None
        params[method][name] = value
    for method, values in params.items():
        try:
            check_params(method, values)
        except InputError as exc:
            raise InputError(f"command line: key '--param' is invalid ({str(exc).rstrip('.')}).") from None
    return params


def parse_grid(text: str | None) -> list[float]:
    if text is None:
        return list(DEFAULT_LAMBDA_GRID)
    try:
        grid = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        grid = []
    if not grid or not all(math.isfinite(g) and g >= 0 for g in grid):
        raise InputError(f"command line: key '--grid' is {text!r}, expected a comma list of non-negative numbers.")
    return grid


def site_overrides(args: argparse.Namespace) -> list[str]:
    """The site dotlist; with ``--data``, ``data.root`` points at it first (so a fastMRI site needs no root)."""
    if args.data is None:
        return list(args.overrides)
    if not args.data.exists():
        raise InputError(f"{args.data}: key '--data' does not exist, expected a fastMRI h5 file or folder.")
    folder = str((args.data if args.data.is_dir() else args.data.parent).resolve())
    quoted = folder.replace("'", "''")
    return [f"data.root='{quoted}'", *args.overrides]


def open_dataset(args: argparse.Namespace, site: SiteConfig, ranks: Ranks) -> FastMRISliceDataset:
    """The slices to reconstruct: ``--data``, the site's fastMRI folder, or its simulated folder
    (under torchrun rank 0 simulates while the others wait)."""
    acq = site.acquisition
    if args.data is not None:
        if not args.data.exists():
            raise InputError(f"{args.data}: key '--data' does not exist, expected a fastMRI h5 file or folder.")
        check_output_folder(args.out, [args.data])
        return FastMRISliceDataset(args.data, mask_type=acq.mask_type, acceleration=acq.acceleration,
                                   center_fraction=acq.center_fraction, mask_seed=acq.mask_seed)
    if site.data.source == "fastmri":
        check_output_folder(args.out, [Path(os.path.expanduser(site.data.root))])
        return site_dataset(site)
    check_output_folder(args.out, [])
    if ranks.is_main:
        dataset = site_dataset(site, workdir=args.out / "data", seed=args.seed)
    ranks.barrier()
    if not ranks.is_main:
        dataset = site_dataset(site, workdir=args.out / "data", seed=args.seed)
    return dataset


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------


def recon_size(info: VolumeInfo) -> tuple[int, int] | None:
    """``reconSpace`` matrix ``(x, y)`` of a file's ISMRMRD header (fastMRI's crop), or ``None``."""
    with h5py.File(info.path, "r") as hf:
        if "ismrmrd_header" not in hf:
            return None
        try:
            root = etree.fromstring(hf["ismrmrd_header"][()])
        except (etree.ParseError, TypeError, ValueError):
            return None
    ns = f"{{{ISMRMRD_NAMESPACE}}}"
    node = root.find(f".//{ns}encoding/{ns}reconSpace/{ns}matrixSize")
    if node is None:
        return None
    try:
        return int(node.find(f"{ns}x").text), int(node.find(f"{ns}y").text)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None


@dataclass
class VolumeResult:
    """The reconstructed slices of one input file, per method (raw scale, cropped)."""

    info: VolumeInfo
    slices: list[int] = field(default_factory=list)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _output_shape(sample: Sample, info: VolumeInfo, sizes: dict[Path, tuple[int, int] | None]) -> tuple[int, int]:
    if sample.target is not None:
        return tuple(sample.target.shape)  # type: ignore[return-value]
    if info.path not in sizes:
        sizes[info.path] = recon_size(info)
    return sizes[info.path] or tuple(sample.kspace.shape[-2:])  # type: ignore[return-value]


def _slices(dataset: FastMRISliceDataset, indices: Sequence[int], oracle: bool,
            map_seconds: list[float]) -> Iterator[tuple[Sample, torch.Tensor]]:
    """Each slice with its sensitivity maps (the maps' wall time appended to ``map_seconds``)."""
    for i in indices:
        sample = dataset[i]
        start = time.perf_counter()
        maps = sensitivity_maps(sample, oracle=oracle)
        map_seconds.append(time.perf_counter() - start)
        yield sample, maps


def volume_metrics(result: VolumeResult, method: str) -> dict[str, float] | None:
    """fastMRI's volume metrics of one file's reconstructed slices against its stored target."""
    info = result.info
    if info.target_key is None:
        return None
    with h5py.File(info.path, "r") as hf:
        target = np.asarray(hf[info.target_key][result.slices])
    pred = np.stack(result.images[method])
    target = center_crop(torch.from_numpy(target), pred.shape[-2:]).numpy()
    return evaluate(target, pred)


def _warm_up() -> None:
    """Build and apply a tiny operator once, so one-off lazy imports inside torch (about 0.5 s on
    the first ``Sense``) are not charged to the first method's ``seconds_per_slice``."""
    op = Sense(torch.ones(1, 1, 2, 2, dtype=torch.complex64), torch.ones(2))
    op.A_adjoint(op.A(torch.ones(1, 1, 2, 2, dtype=torch.complex64)))


def _write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def reconstruct_volume(dataset: FastMRISliceDataset, volume: int, items: Sequence[int], methods: Sequence[str],
                       params: dict[str, dict], oracle: bool, cache: dict[int, tuple[Sample, torch.Tensor]],
                       sizes: dict[Path, tuple[int, int] | None]) -> tuple[VolumeResult, dict[str, list[float]], list[float]]:
    """Every method on one volume's slices. Returns the result, ``{method: [seconds per slice]}`` and
    the maps' seconds; ``cache`` holds slices already read (``--tune``)."""
    info = dataset.volumes[volume]
    result = VolumeResult(info, images={m: [] for m in methods})
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    map_seconds: list[float] = []
    for i in items:
        if i in cache:
            sample, sens_maps = cache[i]
        else:
            sample, sens_maps = next(_slices(dataset, [i], oracle, map_seconds))
        result.slices.append(sample.slice_idx)
        shape = _output_shape(sample, info, sizes)
        for m in methods:
            rec = run_baseline(m, sample, sens_maps, **params[m])
            magnitude = center_crop(rec.image.abs(), shape)
            result.images[m].append(np.asarray(sample.denormalize(magnitude).numpy(), dtype=np.float32))
            seconds[m].append(rec.seconds)
    return result, seconds, map_seconds


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.method)
    params = parse_params(args.param, methods)
    grid = parse_grid(args.grid)
    tuned = [m for m in methods if m in TUNABLE_METHODS] if args.tune else []
    if args.tune and not tuned:
        raise InputError(
            f"command line: key '--tune' needs {' or '.join(TUNABLE_METHODS)} among --method, got {', '.join(methods)}."
        )
    for m in tuned:
        if "lam" in params[m]:
            raise InputError(f"command line: key '--param {m}.lam' conflicts with --tune, expected one of the two.")
    if args.max_slices is not None and args.max_slices < 1:
        raise InputError(f"command line: key '--max-slices' is {args.max_slices}, expected a positive integer.")
    ranks = init_ranks()
    if args.tune and ranks.distributed:
        raise InputError(
            "command line: key '--tune' picks λ on every slice in one process, expected a run without torchrun "
            "(tune once, then pass the λ with --param METHOD.lam=VALUE under torchrun)."
        )
    site = load_site(args.site, site_overrides(args))
    hashed_params = {m: dict(v) for m, v in params.items()}
    if any(m in PRIOR_METHODS for m in methods):
        try:
            prior, _ = load_checkpoint(args.prior)
        except CheckpointError as exc:
            raise InputError(str(exc)) from None
        for p in prior.parameters():
            p.requires_grad_(False)
        for m in methods:
            if m in PRIOR_METHODS:
                if "prior" in params[m]:
                    raise InputError(f"command line: key '--param {m}.prior' is not settable, expected --prior PATH.")
                params[m]["prior"] = prior
                hashed_params[m]["prior"] = file_sha256(args.prior)

    dataset = open_dataset(args, site, ranks)
    count = len(dataset) if args.max_slices is None else min(len(dataset), args.max_slices)
    volumes: dict[int, list[int]] = {}
    for i in range(count):
        volumes.setdefault(dataset.index[i][0], []).append(i)
    if args.oracle_maps:
        for v in volumes:
            if not dataset.volumes[v].has_sens_maps:
                raise InputError(
                    f"{dataset.volumes[v].path}: key 'sens_maps' is missing, expected true maps for --oracle-maps."
                )
    if args.tune:
        for v in volumes:
            if dataset.volumes[v].target_key is None:
                raise InputError(
                    f"{dataset.volumes[v].path}: has no target ('reconstruction_rss' / 'reconstruction_esc'), "
                    f"expected targets for --tune."
                )

    tuning: dict[str, dict] = {}
    cache: dict[int, tuple[Sample, torch.Tensor]] = {}
    map_seconds: list[float] = []
    if tuned:
        stream = list(tqdm(_slices(dataset, range(count), args.oracle_maps, map_seconds), total=count, desc="maps",
                           unit="slice", disable=None))
        cache = dict(enumerate(stream))
        samples, maps = [s for s, _ in stream], [m for _, m in stream]
        for m in tuned:
            best, table = tune_lambda(m, samples, maps, grid, **params[m])
            params[m]["lam"] = hashed_params[m]["lam"] = best
            tuning[m] = {"lam": best, "grid": [{"lam": row.lam, "mean_psnr": row.mean_psnr} for row in table]}
            print(f"{m}: best lam {best:g} (" + ", ".join(f"{r.lam:g}: {r.mean_psnr:.2f} dB" for r in table) + ")")

    base = {"methods": methods, "params": hashed_params, "site": OmegaConf.to_container(OmegaConf.structured(site)),
            "oracle_maps": args.oracle_maps, "data": None if args.data is None else str(args.data.resolve())}
    sizes: dict[Path, tuple[int, int] | None] = {}
    _warm_up()
    order = list(volumes.items())

    def compute(k: int) -> tuple[dict[str, np.ndarray], dict, list[float]]:
        v, items = order[k]
        result, seconds, maps_s = reconstruct_volume(dataset, v, items, methods, params, args.oracle_maps, cache,
                                                     sizes)
        facts = {"slices": result.slices,
                 "methods": {m: {"metrics": volume_metrics(result, m), "seconds": seconds[m]} for m in methods}}
        return {m: np.stack(result.images[m]) for m in methods}, facts, maps_s

    done = run_volumes(ranks, [(dataset.volumes[v].path, [dataset.index[i][1] for i in items]) for v, items in order],
                       base, args.out, methods, compute)
    if done is None:
        return 0
    volume_records, skipped = done.records, done.skipped
    map_seconds = map_seconds + done.timings  # the maps of --tune (read once), then those of the volumes
    metrics: dict[str, dict] = {}
    for m in methods:
        per_volume = [r["methods"][m]["metrics"] for r in volume_records if r["methods"][m]["metrics"] is not None]
        if per_volume:
            metrics[m] = {k: float(np.mean([vm[k] for vm in per_volume])) for k in METRIC_KEYS}
            metrics[m]["seconds_per_slice"] = float(np.mean([t for r in volume_records
                                                             for t in r["methods"][m]["seconds"]]))
    if metrics:
        _write_json(args.out / "metrics.json", metrics)
    if tuning:
        _write_json(args.out / "tuning.json", tuning)

    procs = f" on {ranks.world_size} processes" if ranks.distributed else ""
    maps_rate = f" {np.mean(map_seconds):.3f} s/slice" if map_seconds else ""
    print(f"site {site.name}: {count} slices of {len(volumes)} files{procs}, maps "
          f"{'true (oracle)' if args.oracle_maps else 'ESPIRiT'}{maps_rate}; wrote {args.out / 'reconstructions'}")
    if skipped:
        print(f"  {skipped} slices were already done by an earlier run with the same config (skipped)")
    for m in methods:
        line = f"  {m:12s} {np.mean([t for r in volume_records for t in r['methods'][m]['seconds']]):7.3f} s/slice"
        if m in metrics:
            line += f"  PSNR {metrics[m]['psnr']:6.2f}  SSIM {metrics[m]['ssim']:.4f}  NMSE {metrics[m]['nmse']:.4g}"
        print(line)
    if not metrics:
        print("  no targets in the data: metrics.json not written")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one ``error:`` line on bad input; ``128 + signal``
    after SIGTERM / SIGINT, with the finished volumes kept for a rerun to skip)."""
    try:
        with interruptible():
            return run(parse_args(argv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"{exc}: finished volumes are kept; rerun the same command to complete the set.", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
