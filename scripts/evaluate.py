"""Quality table: every method on a site's slices, PSNR / SSIM as mean ± std, seconds per slice.

    python scripts/evaluate.py --sites source_brain,unseen_center --max-slices 8 \
        --methods all --record docs/results/quality_runs/NAME.md [--prior NAME|PATH] [num_steps=30 ...]
        [site.acquisition.acceleration=8 site.data.split=val ...]
    python scripts/evaluate.py --lambda-check --sites stanford_knee --prior stanford_knee ...

Methods: the method table (:mod:`recon.methods`, the same names as ``adapt.py`` and
``reconstruct.py``) — the classical baselines (``zero_filled``, ``sense``; ``l1wavelet`` and ``tv``
with λ tuned for the best mean PSNR on the very slices evaluated, the "best-tuned" baseline), and the
prior methods through :class:`recon.biasrecon.BiasRecon` on all the slices of a site at once:
``prior_dc`` (near-hard data consistency), ``unadapted``, ``unadapted_sure`` (= BiasRecon without
calibration), ``biasrecon``, ``biasrecon_nosure`` and ``finetune`` (every weight, same loss and
steps). The prior methods start from the library's settings (:class:`~recon.biasrecon.BiasReconSettings`
defaults); bare ``key=value`` items override its fields. ``--prior`` is a bundled prior (``--help``
lists them) or a checkpoint file (default: each site's own ``prior`` key, else ``source_brain``); ``site.KEY=VALUE`` items override the site (another acceleration,
the val split). Sensitivity maps are ESPIRiT from each slice's centre
(:func:`recon.coils.sensitivity_maps`), shared by every method. Metrics are per slice (fastMRI's
definitions), then mean ± std, against fastMRI's target (RSS of the noisy fully sampled data;
``maxval`` = the volume's stored max) and, where the files store it, against the clean reference
(the image before simulated noise, ``reconstruction_clean``; ``maxval`` = its max). The oracle λ of
``l1wavelet`` / ``tv`` is chosen against the clean reference when there is one.

``--lambda-check``: the prior's default λ rule against the unadapted prior at every fixed λ of a grid,
with each rule's distance to the best fixed λ.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recon.atomic import write_text
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.coils import sensitivity_maps
from recon.config import settings_from_dotlist
from recon.data import load_site, site_dataset
from recon.errors import InputError
from recon.jobs import run_main
from recon.methods import CLASSICAL_METHODS, METHODS, TUNABLE_METHODS, parse_lambdas, parse_methods, prior_settings
from recon.methods import reference_stack, run_baseline, slice_scores, tune_lambda
from recon.data import Sample
from recon.operators import Sense
from scores.checkpoints import CheckpointError
from recon.data.sites import site_prior
from scores.priors import PRIOR_HELP, bundled_priors, choose_prior, load_prior
from scores.samplers import TweedieSampler

__all__ = ["evaluate_site", "lambda_check", "markdown", "lambda_markdown", "main"]

GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""Oracle grid of the classical methods' λ (the best λ measured on the real-image sites lies inside it)."""
LAMBDA_CHECK_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
"""Fixed λ of ``--lambda-check`` (chain and final prox)."""
SAMPLER = TweedieSampler()


def _scored(samples: list[Sample], images: list[torch.Tensor]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{against: {"psnr": (mean, std), "ssim": (mean, std)}}`` over the slices."""
    per_slice = [slice_scores(s, im) for s, im in zip(samples, images)]
    out = {}
    for against in per_slice[0]:
        p = np.array([d[against][0] for d in per_slice])
        q = np.array([d[against][1] for d in per_slice])
        out[against] = {"psnr": (float(p.mean()), float(p.std())), "ssim": (float(q.mean()), float(q.std()))}
    return out


def _open(site_name: str, site_overrides: list[str], max_slices: int, workdir: Path) -> list[Sample]:
    dataset = site_dataset(load_site(site_name, site_overrides), workdir=workdir, seed=0)
    return [dataset[i] for i in range(min(max_slices, len(dataset)))]


def _label(site_name: str, site_overrides: list[str]) -> str:
    return site_name + "".join(f" {o}" for o in site_overrides)


def evaluate_site(site_name: str, methods: list[str], max_slices: int, prior_path: Path, workdir: Path,
                  settings: BiasReconSettings, site_overrides: list[str] = (),
                  grid: tuple[float, ...] = GRID) -> list[dict]:
    """One row per method: per-slice PSNR / SSIM (mean, std) against the target and the clean reference,
    and seconds per slice, on the site's first slices. The classical methods' λ is the oracle one, chosen
    on these slices against the clean reference where the files store it (else against the target)."""
    samples = _open(site_name, list(site_overrides), max_slices, workdir)
    maps = [sensitivity_maps(s) for s in samples]
    against = "reference" if all(s.reference is not None for s in samples) else "target"
    site_label = _label(site_name, list(site_overrides))
    rows = []

    def record(method: str, images: list[torch.Tensor], seconds: float, params: str) -> None:
        scores = _scored(samples, images)
        rows.append(dict(site=site_label, method=method, scores=scores, seconds=seconds / len(samples),
                         params=params, n=len(samples)))
        text = "  ".join(f"{k}: PSNR {v['psnr'][0]:6.2f} ± {v['psnr'][1]:4.2f} SSIM {v['ssim'][0]:.3f}"
                         for k, v in scores.items())
        print(f"{site_label:16s} {method:18s} {text}  {seconds / len(samples):6.2f} s/slice  {params}", flush=True)

    for method in [m for m in methods if m in CLASSICAL_METHODS]:
        start = time.perf_counter()
        if method in TUNABLE_METHODS:
            best, table = tune_lambda(method, samples, maps, grid=grid, against=against)
            edge = " — at the grid's edge" if best in (min(grid), max(grid)) else ""
            images = list(next(t for t in table if t.lam == best).images)
            label = f"oracle λ={best:g} (best of {len(grid)} on these slices vs the {against}{edge})"
            seconds = (time.perf_counter() - start) / len(grid)
        else:
            images = [run_baseline(method, s, m).image for s, m in zip(samples, maps)]
            label, seconds = "", time.perf_counter() - start
        record(method, images, seconds, label)

    prior_methods = [m for m in methods if METHODS[m].kind == "prior"]
    if not prior_methods:
        return rows
    prior = load_prior(prior_path).model
    op = Sense(torch.stack(maps), torch.stack([s.mask for s in samples])[:, None])
    y = torch.stack([s.kspace for s in samples])
    for method in prior_methods:
        st = prior_settings(settings, method)
        reference = reference_stack(samples) if st.calib_loss == "reference" else None
        result = BiasRecon(prior, op, y, st, sampler=SAMPLER, reference=reference).run(progress=True)
        label = (f"λ={result.lam:.3g}" + (" (SURE)" if st.sure else "") + f", chain λ={result.chain_lam:.3g}"
                 + (" (noise rule)" if st.lam_rule == "noise" else "") + f", {st.num_steps} levels"
                 + (f", mean of {st.num_samples} samples" if st.num_samples > 1 else ""))
        if st.adapt != "none":
            label += f", held-out {result.val_loss_zero:.4f}→{result.val_loss_best:.4f}"
        record(method, list(result.image[:, 0]), result.seconds, label)
    return rows


def lambda_check(site_name: str, max_slices: int, prior_path: Path, workdir: Path, settings: BiasReconSettings,
                 site_overrides: list[str] = (), grid: tuple[float, ...] = LAMBDA_CHECK_GRID) -> list[dict]:
    """The default λ rule (``unadapted_sure`` with ``settings``) against the unadapted prior at each fixed λ of
    ``grid`` (chain and final data consistency), scored against the target and the clean reference."""
    samples = _open(site_name, list(site_overrides), max_slices, workdir)
    op = Sense(torch.stack([sensitivity_maps(s) for s in samples]), torch.stack([s.mask for s in samples])[:, None])
    y = torch.stack([s.kspace for s in samples])
    prior = load_prior(prior_path).model
    site_label = _label(site_name, list(site_overrides))
    runs = [(f"fixed λ={lam:g}", prior_settings(settings, "unadapted", {"lam": lam})) for lam in grid]
    runs.append(("default rule", prior_settings(settings, "unadapted_sure")))
    rows = []
    for label, st in runs:
        result = BiasRecon(prior, op, y, st, sampler=SAMPLER).run()
        scores = _scored(samples, list(result.image[:, 0]))
        rows.append(dict(site=site_label, method=label, lam=result.lam, chain_lam=result.chain_lam, scores=scores))
        text = "  ".join(f"{k} {v['psnr'][0]:.2f} / {v['ssim'][0]:.3f}" for k, v in scores.items())
        print(f"{site_label:16s} {label:14s} λ={result.lam:<8.3g} {text}", flush=True)
    return rows


def _cell(scores: dict, against: str) -> str:
    if against not in scores:
        return "—"
    p, q = scores[against]["psnr"], scores[against]["ssim"]
    return f"{p[0]:.2f} ± {p[1]:.2f} / {q[0]:.3f} ± {q[1]:.3f}"


def lambda_markdown(rows: list[dict], command: str) -> str:
    """The λ check as a markdown table, with each rule's distance to the best fixed λ (vs the reference)."""
    head = (f"Command: `{command}`; {_dt.date.today().isoformat()}.\n\n"
            "| site | λ rule | chain λ | final λ | PSNR / SSIM vs clean reference | PSNR / SSIM vs target | − best fixed (dB, vs reference) |\n"
            "|---|---|---:|---:|---|---|---:|\n")
    best = {}
    for r in rows:
        if r["method"].startswith("fixed") and "reference" in r["scores"]:
            best[r["site"]] = max(best.get(r["site"], -math.inf), r["scores"]["reference"]["psnr"][0])
    body = ""
    for r in rows:
        gap = (f"{r['scores']['reference']['psnr'][0] - best[r['site']]:+.2f}" if r["site"] in best else "—")
        body += (f"| {r['site']} | {r['method']} | {r['chain_lam']:.3g} | {r['lam']:.3g} | {_cell(r['scores'], 'reference')} | "
                 f"{_cell(r['scores'], 'target')} | {gap} |\n")
    return head + body


def markdown(rows: list[dict], command: str) -> str:
    """The quality table as markdown."""
    head = (f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
            f"{_dt.date.today().isoformat()}.\nCommand: `{command}`\n\n"
            "| site | method | PSNR / SSIM vs clean reference | PSNR / SSIM vs target | s/slice | tuned / chosen |\n"
            "|---|---|---|---|---:|---|\n")
    body = "".join(
        f"| {r['site']} | {r['method']} | {_cell(r['scores'], 'reference')} | {_cell(r['scores'], 'target')} | "
        f"{r['seconds']:.2f} | {r['params']} |\n" for r in rows)
    return head + body


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="source_brain,unseen_center")
    parser.add_argument("--methods", default="all", help="comma list or 'all' (every method of the table)")
    parser.add_argument("--max-slices", type=int, default=8)
    parser.add_argument("--prior", default=None, help=PRIOR_HELP.format(names=", ".join(bundled_priors())))
    parser.add_argument("--workdir", type=Path, default=Path("out/evaluate_data"))
    parser.add_argument("--record", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--lambda-check", action="store_true",
                        help="the default λ rule vs the unadapted prior at fixed λ, against the target and the "
                             "clean reference")
    parser.add_argument("--oracle-grid", default=",".join(f"{g:g}" for g in GRID),
                        help="comma list of the λ tried for the oracle l1wavelet / tv (default %(default)s)")
    parser.add_argument("--lambda-grid", default=",".join(f"{g:g}" for g in LAMBDA_CHECK_GRID),
                        help="comma list of the fixed λ of --lambda-check (default %(default)s)")
    parser.add_argument("overrides", nargs="*",
                        help="BiasReconSettings overrides (num_steps=30) and site overrides with the prefix site. "
                             "(site.acquisition.acceleration=8, site.data.split=val)")
    args = parser.parse_args(argv)
    methods = parse_methods("all+prior" if args.methods == "all" else args.methods, "command line: key '--methods'")
    site_overrides = [o[len("site."):] for o in args.overrides if o.startswith("site.")]
    settings = settings_from_dotlist([o for o in args.overrides if not o.startswith("site.")])
    sites = args.sites.split(",")
    uses_prior = args.lambda_check or any(METHODS[m].kind == "prior" for m in methods)
    priors = {site: (None, "") for site in sites}
    for site in sites if uses_prior or args.prior is not None else ():  # every prior checked before any work
        named, file = site_prior(site, site_overrides)
        priors[site] = choose_prior(args.prior, file.stem, named, str(file))
    oracle_grid = tuple(parse_lambdas(args.oracle_grid, "command line: key '--oracle-grid'", positive=True))
    lambda_grid = tuple(parse_lambdas(args.lambda_grid, "command line: key '--lambda-grid'", positive=True))
    rows = []
    for site in sites:
        prior, why = priors[site]
        if why:
            print(f"{site}: prior {why}")
        if args.lambda_check:
            rows += lambda_check(site, args.max_slices, prior, args.workdir, settings, site_overrides, lambda_grid)
        else:
            rows += evaluate_site(site, methods, args.max_slices, prior, args.workdir, settings, site_overrides,
                                  oracle_grid)
    command = "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = lambda_markdown(rows, command) if args.lambda_check else markdown(rows, command)
    print(table)
    if args.record is not None:
        write_text(args.record, table)
        print(f"wrote {args.record}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; 2 with one ``error:`` line on bad input (methods, overrides, ``--prior``)."""
    return run_main(_run, argv, (CheckpointError, InputError))


if __name__ == "__main__":
    sys.exit(main())
