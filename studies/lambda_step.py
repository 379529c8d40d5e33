"""The λ-step measured: which σ SURE should weigh its divergence with, on the open-world matrix's slices.

    python studies/lambda_step.py                                  # the cells below, 6 slices each
    python studies/lambda_step.py --cells stanford_knee/source_brain/8 --slices 2

For each slice of each cell (``prior/domain/acceleration`` of ``configs/matrix/open_world_template.yaml``; the
matrix's simulated data and coil maps under ``--matrix-out`` are reused) the unadapted prior's x-step chain
runs once with BiasRecon's λ-step probe (:meth:`recon.biasrecon.BiasRecon.sure_chain`), and the final prox
is scored against the clean reference for: the chain's fixed λ (the method without SURE), SURE's λ with the
noise σ (corner estimate), SURE's λ with the regression σ of the SENSE least-squares fit
(:func:`recon.sure.residual_sigma`), and the best λ of a wide grid (an oracle). Both SURE choices are the
library's (:meth:`recon.biasrecon.BiasRecon.choose_lambda`: its grid and refinement); the divergence probe's
step is ``sure_epsilon`` times the noise σ for both. Also reported: χ² = (residual σ / noise σ)², how far
the forward model is from explaining the data.
Records go to ``OUT/records/<cell>/<slice>.json`` (a rerun skips them); the table to ``OUT/lambda_step.md``.

A second table reads the matrix's own records (``--matrix-out``): BiasRecon without SURE against the unadapted
prior per cell, as run and with the misfit gate (``biasrecon.misfit_limit``) applied per slice by the χ² measured
here (χ² is a property of the domain's slice, whatever the prior): what the gate would have changed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recon.atomic import write_text
from recon.biasrecon import BiasRecon
from recon.errors import InputError
from recon.jobs import run_main
from recon.methods import prior_settings, slice_scores
from recon.openworld import Workspace, load_matrix
from recon.operators import Sense
from recon.resources import config_path
from scores.checkpoints import CheckpointError
from scores.priors import load_prior, resolve_prior
from scores.samplers import TweedieSampler

CELLS = ("source_brain/source_brain/4", "source_brain/real_epi/4", "siat_head_t2/source_brain/4",
         "stanford_knee/source_brain/4", "stanford_knee/source_brain/8", "stanford_knee/stanford_knee/4",
         "source_brain/stanford_knee/4", "source_brain/stanford_knee/8", "siat_head_t2/siat_head_t2/4")
ORACLE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _parse_cell(text: str, priors: dict, domains: dict) -> tuple[str, str, int]:
    parts = text.split("/")
    if len(parts) != 3 or parts[0] not in priors or parts[1] not in domains or not parts[2].isdigit():
        raise InputError(f"command line: key '--cells' has {text!r}, expected prior/domain/acceleration with a prior "
                         f"of {sorted(priors)} and a domain of {sorted(domains)}, e.g. stanford_knee/source_brain/8.")
    return parts[0], parts[1], int(parts[2])


def measure_slice(ws: Workspace, prior: str, domain: str, acceleration: int, index: int) -> dict:
    """One slice: PSNR (vs the clean reference) of the final prox at each λ rule, and the σ's."""
    sample, maps = ws.sample(domain, acceleration, index), ws.maps(domain, acceleration, index)
    settings = prior_settings(ws.spec.settings, "unadapted_sure")
    op = Sense(maps[None], sample.mask[None, None])
    recon = BiasRecon(ws.prior(prior), op, sample.kspace[None], settings, sampler=ws.sampler)
    noise = recon.noise_sigma  # BiasRecon measured the misfit χ² = (regression σ / noise σ)² already
    residual = None if recon.misfit is None else noise * recon.misfit ** 0.5
    chain = recon.sure_chain(noise)  # the probe's step is sure_epsilon times the noise σ for both choices

    def score(image: torch.Tensor) -> float:
        return slice_scores(sample, image[0, 0])["reference"][0]

    picks = {}
    for name, sigma in (("sure_noise", noise), ("sure_residual", residual if residual is not None else noise)):
        lam, image, _ = recon.choose_lambda(chain, sigma)
        picks[name] = {"lam": lam, "psnr": score(image)}
    oracle = {lam: score(chain.prox(lam)) for lam in ORACLE_GRID}
    best = max(oracle, key=oracle.get)
    return {"prior": prior, "domain": domain, "acceleration": acceleration, "slice": index,
            "date": time.strftime("%Y-%m-%d"), "noise_sigma": noise, "residual_sigma": residual,
            "chi2": None if residual is None else (residual / noise) ** 2,
            "fixed": {"lam": recon.lam, "psnr": score(chain.prox(recon.lam))}, **picks,
            "oracle": {"lam": best, "psnr": oracle[best]}, "grid": {str(k): v for k, v in oracle.items()}}


def report(records: dict[str, list[dict]], command: str) -> str:
    """The per-cell table: mean PSNR of each λ rule and its gain over the fixed λ (mean, worst slice)."""
    lines = ["# The λ-step: SURE's σ, measured", "",
             f"`{command}` — {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, torch {torch.__version__}.", "",
             "PSNR (dB) of the unadapted prior's final prox against the clean reference; Δ = gain over the chain's "
             "fixed λ (mean / worst slice); χ² = (regression σ / noise σ)².", "",
             "| cell | slices | χ² | fixed λ | SURE, noise σ: Δ (worst) | SURE, regression σ: Δ (worst) | best λ: Δ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    everything: list[dict] = []
    for cell, recs in records.items():
        everything += recs
        lines.append(_row(cell, recs))
    if len(records) > 1:
        lines.append(_row("**all**", everything))
    return "\n".join(lines) + "\n"


def _row(label: str, recs: list[dict]) -> str:
    fixed = np.array([r["fixed"]["psnr"] for r in recs])
    gain = {k: np.array([r[k]["psnr"] for r in recs]) - fixed for k in ("sure_noise", "sure_residual", "oracle")}
    chi2 = [r["chi2"] for r in recs if r["chi2"] is not None]
    chi2_text = f"{min(chi2):.1f}–{max(chi2):.1f}" if chi2 else "—"
    return (f"| {label} | {len(recs)} | {chi2_text} | {fixed.mean():.2f} | {gain['sure_noise'].mean():+.2f} "
            f"({gain['sure_noise'].min():+.2f}) | {gain['sure_residual'].mean():+.2f} "
            f"({gain['sure_residual'].min():+.2f}) | {gain['oracle'].mean():+.2f} |")


def gate_table(matrix_records: Path, chi2: dict[tuple[str, int, int], float], limit: float) -> str:
    """Per matrix cell: mean gain (dB vs the clean reference) of ``biasrecon_nosure`` over ``unadapted`` as run,
    and with the slices whose χ² exceeds ``limit`` set to the unadapted prior (the gate skips their calibration)."""
    lines = [f"| cell | slices | as run: gain (worst) | gated at χ² > {limit:g}: gain (worst) | slices gated |",
             "|---|---:|---:|---:|---:|"]
    for cell in sorted(p.name for p in matrix_records.iterdir() if (p / "biasrecon_nosure").is_dir()):
        def load(method: str) -> dict[int, dict]:
            return {r["slice"]: r for r in (json.loads(f.read_text())
                                           for f in sorted((matrix_records / cell / method).glob("*.json")))}
        unadapted, adapted = load("unadapted"), load("biasrecon_nosure")
        pairs = [(s, adapted[s]["psnr_reference"] - unadapted[s]["psnr_reference"]) for s in adapted if s in unadapted]
        keys = [(adapted[s]["domain"], adapted[s]["acceleration"], s) for s, _ in pairs]
        if not pairs or any(k not in chi2 for k in keys):
            continue
        gains = np.array([g for _, g in pairs])
        gated = np.array([0.0 if chi2[k] > limit else g for k, (_, g) in zip(keys, pairs)])
        lines.append(f"| {cell} | {len(pairs)} | {gains.mean():+.2f} ({gains.min():+.2f}) | {gated.mean():+.2f} "
                     f"({gated.min():+.2f}) | {sum(chi2[k] > limit for k in keys)} |")
    return "\n".join(lines) + "\n"


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="prior/domain/acceleration of the matrix")
    parser.add_argument("--slices", type=int, default=6, help="test slices per cell (from the first)")
    parser.add_argument("--matrix-out", type=Path, default=Path("out/open_world"),
                        help="the matrix's folder: its simulated data and coil maps are reused (or made there)")
    parser.add_argument("--out", type=Path, default=Path("out/lambda_step"))
    parser.add_argument("--misfit-limit", type=float, default=2.5, help="χ² of the gate's table (default 2.5)")
    args = parser.parse_args(argv)
    spec = load_matrix(config_path("matrix", "open_world_template.yaml"))
    if args.slices < 1 or args.slices > spec.slices:
        raise InputError(f"command line: key '--slices' is {args.slices}, expected 1 to {spec.slices}.")
    cells = [_parse_cell(text, spec.priors, spec.domains) for text in args.cells]
    torch.manual_seed(0)
    ws = Workspace(spec, args.matrix_out, TweedieSampler(), lambda value: load_prior(resolve_prior(value)).model)
    records: dict[str, list[dict]] = {}
    todo = [(c, s) for c in cells for s in range(args.slices)]
    for (prior, domain, acc), index in tqdm(todo, desc="λ-step", unit="slice"):
        key = f"{prior}__{domain}__{acc}x"
        path = args.out / "records" / key / f"{index:03d}.json"
        if path.exists():
            record = json.loads(path.read_text())
        else:
            record = measure_slice(ws, prior, domain, acc, index)
            write_text(path, json.dumps(record, indent=1))
        records.setdefault(key, []).append(record)
    command = "python studies/lambda_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(records, command.strip())
    chi2 = {(r["domain"], r["acceleration"], r["slice"]): r["chi2"] for recs in records.values() for r in recs
            if r["chi2"] is not None}
    if (args.matrix_out / "records").is_dir():
        text += ("\n## The misfit gate on the matrix's records\n\nBiasRecon without SURE, gain over the unadapted "
                 "prior (dB vs the clean reference), per matrix cell; a cell with a slice whose χ² was not measured "
                 "above (or cannot be: too few residual degrees of freedom) is left out.\n\n"
                 + gate_table(args.matrix_out / "records", chi2, args.misfit_limit))
    write_text(args.out / "lambda_step.md", text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; 2 with one ``error:`` line on bad input."""
    return run_main(_run, argv, (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
