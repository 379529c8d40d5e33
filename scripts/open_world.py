"""The open-world matrix: every prior on every test domain, every method, with headroom and closure.

    python scripts/open_world.py                       # one process; rerun to resume
    python scripts/open_world.py & python scripts/open_world.py &   # two processes share the units
    torchrun --nproc_per_node 2 scripts/open_world.py  # the same under torchrun
    python scripts/open_world.py --report-only         # tables and figures from the records so far

The matrix (priors, domains, cells, methods) is ``configs/matrix/open_world.yaml`` (``--config``; ``key=value``
items override it). The work is one unit per slice and method (:mod:`recon.openworld`): a process claims a
unit, computes it and writes its record; finished units are skipped, so the command resumes, and any number
of processes share the list. At the end (and with ``--report-only``) it writes ``OUT/open_world.md`` (the
tables), ``OUT/figures/closure_heatmap.png`` and one figure per cross-anatomy cell.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recon.atomic import write_bytes, write_text
from recon.errors import InputError
from recon.figures import matrix_heatmap, panel_figure
from recon.jobs import run_main
from recon.openworld import LABELS, MatrixSpec, Workspace, aggregate, claim, iterate_pending, load_matrix, release
from recon.openworld import report_markdown, run_unit, units
from recon.resources import config_path
from scores.checkpoints import CheckpointError
from scores.priors import file_sha256, load_prior, resolve_prior
from scores.samplers import TweedieSampler


def _resolve_priors(spec: MatrixSpec) -> dict[str, Path]:
    paths = {}
    for name, value in spec.priors.items():
        try:
            paths[name] = resolve_prior(value)
        except CheckpointError:
            raise InputError(f"{spec.source}: key 'priors.{name}' is {value!r}, expected a bundled prior or an existing "
                             f"checkpoint (train it with scripts/train_score.py --config configs/prior/{name}.yaml "
                             f"--out runs/{name}).") from None
    return paths


def _check_out(spec: MatrixSpec, out: Path, paths: dict[str, Path]) -> None:
    """``OUT/matrix.json`` fixes what the records depend on; another config in the same folder is refused."""
    facts = {"priors": {n: file_sha256(p) for n, p in paths.items()},
             "domains": {n: [d.site, list(d.overrides), list(d.center_fractions)] for n, d in spec.domains.items()},
             "settings": repr(spec.settings), "slices": spec.slices, "oracle_grid": list(spec.oracle_grid)}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    marker = out / "matrix.json"
    if marker.exists():
        stored = json.loads(marker.read_text()).get("hash")
        if stored != digest:
            raise InputError(f"{marker}: key 'hash' is {stored}, expected {digest}: the folder holds records of another "
                             f"matrix (priors, domains or settings changed); choose another --out.")
        return
    write_text(marker, json.dumps({"hash": digest, **facts}, indent=1))


def _figures(spec: MatrixSpec, agg: dict, out: Path) -> list[Path]:
    written = []
    priors = list(spec.priors)
    domains = list(spec.domains)
    values = np.full((len(priors), len(domains)), np.nan)
    notes = np.full((len(priors), len(domains)), "—", dtype=object)
    for entry in agg["cells"].values():
        cell = entry["cell"]
        if cell.acceleration != 4:
            continue
        i, j = priors.index(cell.prior), domains.index(cell.domain)
        row = entry["rows"].get("biasrecon")
        head = entry["headroom"]
        if cell.prior == spec.domains[cell.domain].own_prior:
            notes[i, j] = "own prior\n" + ("…" if row is None or row.get("gain") is None else f"gain {row['gain']:+.2f} dB")
        elif row is not None and row.get("closure") is not None:
            values[i, j] = row["closure"]
            notes[i, j] = f"{100 * row['closure']:.0f} %\n({row['gain']:+.2f} of {head:+.2f} dB)"
        elif row is not None and row.get("gain") is not None:
            notes[i, j] = f"gain {row['gain']:+.2f} dB\nheadroom " + ("n/a" if head is None else f"{head:+.2f}")
        else:
            notes[i, j] = "…"
    path = out / "figures" / "closure_heatmap.png"
    write_bytes(path, matrix_heatmap(values, priors, domains, "BiasRecon's closure of the headroom at 4× "
                                     "((BiasRecon − unadapted) / (own prior − unadapted))", notes))
    written.append(path)
    for key, entry in agg["cells"].items():
        cell = entry["cell"]
        if not entry["cross"]:
            continue
        folder = out / "images" / key
        reference = out / "images" / f"reference__{cell.domain}__{cell.acceleration}x.npy"
        adapters = [m for m in ("finetune", "lora", "learned_lam") if m in entry["rows"]]
        if not reference.exists() or not all((folder / f"{m}.npy").exists() for m in ("unadapted", "biasrecon")):
            continue
        images = {LABELS[m]: np.load(folder / f"{m}.npy") for m in ("unadapted", "biasrecon")}
        if adapters:
            best = max(adapters, key=lambda m: entry["rows"][m]["psnr_reference"][0])
            images[LABELS[best]] = np.load(folder / f"{best}.npy")
        if (folder / "oracle_gamma.npy").exists():
            images[LABELS["oracle_gamma"]] = np.load(folder / "oracle_gamma.npy")
        path = out / "figures" / f"{key}.png"
        write_bytes(path, panel_figure(np.load(reference), images, f"{cell.prior} prior on {cell.domain}, "
                                       f"{cell.acceleration}×, first test slice"))
        written.append(path)
    return written


def _report(spec: MatrixSpec, out: Path, command: str) -> None:
    agg = aggregate(spec, out)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    write_text(out / "open_world.md", report_markdown(spec, agg, command, machine))
    figures = _figures(spec, agg, out)
    print(f"wrote {out / 'open_world.md'} and {len(figures)} figures under {out / 'figures'}")


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="matrix config (default configs/matrix/open_world.yaml)")
    parser.add_argument("--out", type=Path, default=Path("out/open_world"))
    parser.add_argument("--report-only", action="store_true", help="write the tables and figures from the records")
    parser.add_argument("--max-units", type=int, default=None, help="stop after this many units (this process)")
    parser.add_argument("overrides", nargs="*", help="matrix config overrides (slices=2, settings.num_steps=10)")
    args = parser.parse_args(argv)
    config = args.config if args.config is not None else config_path("matrix", "open_world.yaml")
    if not Path(config).exists():
        raise InputError(f"command line: key '--config' is {str(config)!r}, expected an existing matrix config.")
    spec = load_matrix(config, args.overrides)
    command = "python scripts/open_world.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = _resolve_priors(spec)
    _check_out(spec, args.out, paths)
    if not args.report_only:
        ws = Workspace(spec, args.out, TweedieSampler(), lambda value: load_prior(resolve_prior(value)).model)
        groups: dict[str, list] = {}
        for unit in units(spec):
            groups.setdefault(unit.group, []).append(unit)
        bar, bar_group, done_units = None, None, 0
        for unit in iterate_pending(spec, args.out):
            if args.max_units is not None and done_units >= args.max_units:
                break
            path = unit.record_path(args.out)
            if path.exists() or not claim(path):
                continue
            try:
                if unit.group != bar_group:
                    if bar is not None:
                        bar.close()
                    total = len(groups[unit.group])
                    finished = sum(u.record_path(args.out).exists() for u in groups[unit.group])
                    bar, bar_group = tqdm(total=total, initial=finished, desc=unit.group, unit="unit"), unit.group
                bar.set_postfix_str(f"{unit.method} slice {unit.slice}" + ("" if unit.lam is None else f" λ={unit.lam:g}"))
                run_unit(ws, unit)
                bar.update(1)
                done_units += 1
            finally:
                release(path)
        if bar is not None:
            bar.close()
    _report(spec, args.out, command)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; 2 with one ``error:`` line on bad input (config, priors, data)."""
    return run_main(_run, argv, (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
