"""Quality table: every method on a site's slices, PSNR / SSIM as mean ± std, seconds per slice.

    python scripts/evaluate.py --sites source_brain,unseen_center --max-slices 8 \
        --methods all --record docs/results/quality_runs/NAME.md [--prior NAME|PATH] [num_steps=30 ...]

Methods: the method table (:mod:`recon.methods`, the same names as ``adapt.py`` and
``reconstruct.py``) — the classical baselines (``zero_filled``, ``sense``; ``l1wavelet`` and ``tv``
with λ tuned for the best mean PSNR on the very slices evaluated, the "best-tuned" baseline), and the
prior methods through :class:`recon.biasrecon.BiasRecon` on all the slices of a site at once:
``prior_dc`` (near-hard data consistency), ``unadapted``, ``unadapted_sure`` (= BiasRecon without
calibration), ``biasrecon``, ``biasrecon_nosure`` and ``finetune`` (every weight, same loss and
steps). The prior methods start from the library's settings (:class:`~recon.biasrecon.BiasReconSettings`
defaults); bare ``key=value`` items override its fields. ``--prior`` is a bundled prior (``--help``
lists them) or a checkpoint file. Sensitivity maps are ESPIRiT from each slice's centre
(:func:`recon.coils.sensitivity_maps`), shared by every method. Metrics are per slice (fastMRI's
definitions, ``maxval`` = the volume's stored max), then mean ± std.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
from recon.data.transforms import center_crop
from recon.errors import InputError
from recon.jobs import run_main
from recon.methods import CLASSICAL_METHODS, METHODS, TUNABLE_METHODS, parse_methods, prior_settings
from recon.methods import run_baseline, tune_lambda
from recon.metrics import psnr, ssim
from recon.operators import Sense
from scores.checkpoints import CheckpointError
from scores.priors import DEFAULT_PRIOR, bundled_priors, load_prior, resolve_prior
from scores.samplers import TweedieSampler

__all__ = ["evaluate_site", "sure_check", "markdown", "sure_markdown", "main"]

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SAMPLER = TweedieSampler()


def _slice_metrics(target: torch.Tensor, image: torch.Tensor, maxval: float) -> tuple[float, float]:
    pred = center_crop(image.abs(), target.shape[-2:]).numpy()[None].astype(np.float32)
    gt = target.numpy()[None].astype(np.float32)
    return psnr(gt, pred, maxval), ssim(gt, pred, maxval)


def _batch(samples: list) -> tuple[Sense, torch.Tensor]:
    """The operator (ESPIRiT maps) and k-space of all the slices at once."""
    op = Sense(torch.stack([sensitivity_maps(s) for s in samples]), torch.stack([s.mask for s in samples])[:, None])
    return op, torch.stack([s.kspace for s in samples])


def evaluate_site(site_name: str, methods: list[str], max_slices: int, prior_path: Path, workdir: Path,
                  settings: BiasReconSettings) -> list[dict]:
    """One row per method: per-slice PSNR / SSIM (mean, std) and seconds per slice on the site's first slices."""
    dataset = site_dataset(load_site(site_name), workdir=workdir, seed=0)
    samples = [dataset[i] for i in range(min(max_slices, len(dataset)))]
    maps = [sensitivity_maps(s) for s in samples]
    targets = [s.target for s in samples]
    # Sample.max_value is already on the normalised scale (the file's max / scale)
    maxvals = [float(s.max_value) if s.max_value else float(s.target.max()) for s in samples]
    rows = []

    def record(method: str, images: list[torch.Tensor], seconds: float, params: str) -> None:
        scores_ = [_slice_metrics(t, im, mv) for t, im, mv in zip(targets, images, maxvals)]
        p, q = np.array([a for a, _ in scores_]), np.array([b for _, b in scores_])
        rows.append(dict(site=site_name, method=method, psnr=(p.mean(), p.std()), ssim=(q.mean(), q.std()),
                         seconds=seconds / len(samples), params=params, n=len(samples)))
        print(f"{site_name:16s} {method:18s} PSNR {p.mean():6.2f} ± {p.std():4.2f}  SSIM {q.mean():.3f} ± "
              f"{q.std():.3f}  {seconds / len(samples):6.2f} s/slice  {params}", flush=True)

    for method in [m for m in methods if m in CLASSICAL_METHODS]:
        params, label = {}, ""
        if method in TUNABLE_METHODS:
            best, _ = tune_lambda(method, samples, maps, grid=GRID)
            params, label = {"lam": best}, f"λ={best:g} (best of {len(GRID)} on these slices)"
        start = time.perf_counter()
        images = [run_baseline(method, s, m, **params).image for s, m in zip(samples, maps)]
        record(method, images, time.perf_counter() - start, label)

    prior_methods = [m for m in methods if METHODS[m].kind == "prior"]
    if not prior_methods:
        return rows
    prior = load_prior(prior_path).model
    op = Sense(torch.stack(maps), torch.stack([s.mask for s in samples])[:, None])
    y = torch.stack([s.kspace for s in samples])
    for method in prior_methods:
        st = prior_settings(settings, method)
        result = BiasRecon(prior, op, y, st, sampler=SAMPLER).run(progress=True)
        label = f"λ={result.lam:g}" + (" (SURE)" if st.sure else "") + f", {st.num_steps} levels"
        if st.adapt != "none":
            label += f", held-out {result.val_loss_zero:.4f}→{result.val_loss_best:.4f}"
        record(method, list(result.image[:, 0]), result.seconds, label)
    return rows


def sure_check(site_name: str, max_slices: int, prior_path: Path, workdir: Path, settings: BiasReconSettings,
               grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)) -> list[dict]:
    """SURE's λ against a fixed-λ grid, scored against the stored (noisy) targets and the noiseless truth.

    The noiseless truth is the same simulation (same subjects, deformations, coils, masks) with
    ``noise.sigma = 1e-7``; only the noise differs, so its RSS target is the clean image.
    """
    noisy = site_dataset(load_site(site_name), workdir=workdir / "noisy", seed=0)
    clean = site_dataset(load_site(site_name, ["noise.sigma=1e-7"]), workdir=workdir / "noiseless", seed=0)
    count = min(max_slices, len(noisy))
    samples, truths = [noisy[i] for i in range(count)], [clean[i] for i in range(count)]
    op, y = _batch(samples)
    prior = load_prior(prior_path).model
    rows = []
    runs = [(f"fixed λ={lam:g}", prior_settings(settings, "unadapted", {"lam": lam})) for lam in grid]
    runs.append(("SURE", prior_settings(settings, "unadapted_sure", {"lam_grid": grid})))
    for label, st in runs:
        result = BiasRecon(prior, op, y, st, sampler=SAMPLER).run()
        row = dict(site=site_name, method=label, lam=result.lam)
        for key, targets in (("noisy", [s.target for s in samples]),
                             ("noiseless", [t.target * t.scale / s.scale for t, s in zip(truths, samples)])):
            pairs = [_slice_metrics(t, im, float(t.max())) for t, im in zip(targets, result.image[:, 0])]
            row[key] = (float(np.mean([a for a, _ in pairs])), float(np.mean([b for _, b in pairs])))
        rows.append(row)
        print(f"{site_name:16s} {label:14s} λ={result.lam:<6g} noisy target {row['noisy'][0]:.2f} / {row['noisy'][1]:.3f}"
              f"   noiseless truth {row['noiseless'][0]:.2f} / {row['noiseless'][1]:.3f}", flush=True)
    return rows


def sure_markdown(rows: list[dict], command: str) -> str:
    """The SURE check as a markdown table."""
    head = (f"Command: `{command}`; {_dt.date.today().isoformat()}.\n\n"
            "| site | λ rule | λ | PSNR / SSIM vs stored (noisy RSS) target | PSNR / SSIM vs noiseless truth |\n"
            "|---|---|---:|---|---|\n")
    return head + "".join(f"| {r['site']} | {r['method']} | {r['lam']:g} | {r['noisy'][0]:.2f} / {r['noisy'][1]:.3f} | "
                          f"{r['noiseless'][0]:.2f} / {r['noiseless'][1]:.3f} |\n" for r in rows)


def markdown(rows: list[dict], command: str) -> str:
    """The quality table as markdown."""
    head = (f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
            f"{_dt.date.today().isoformat()}.\nCommand: `{command}`\n\n"
            "| site | method | PSNR (dB) | SSIM | s/slice | tuned / chosen |\n|---|---|---|---|---:|---|\n")
    body = "".join(
        f"| {r['site']} | {r['method']} | {r['psnr'][0]:.2f} ± {r['psnr'][1]:.2f} | {r['ssim'][0]:.3f} ± "
        f"{r['ssim'][1]:.3f} | {r['seconds']:.2f} | {r['params']} |\n" for r in rows)
    return head + body


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="source_brain,unseen_center")
    parser.add_argument("--methods", default="all", help="comma list or 'all' (every method of the table)")
    parser.add_argument("--max-slices", type=int, default=8)
    parser.add_argument("--prior", default=DEFAULT_PRIOR,
                        help=f"a bundled prior ({', '.join(bundled_priors())}) or a checkpoint file")
    parser.add_argument("--workdir", type=Path, default=Path("out/evaluate_data"))
    parser.add_argument("--record", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--sure-check", action="store_true",
                        help="SURE's λ vs a 5-point fixed-λ grid, against noisy targets and the noiseless truth")
    parser.add_argument("overrides", nargs="*", help="BiasReconSettings overrides, e.g. num_steps=30")
    args = parser.parse_args(argv)
    methods = parse_methods("all+prior" if args.methods == "all" else args.methods, "command line: key '--methods'")
    settings = settings_from_dotlist(args.overrides)
    prior = resolve_prior(args.prior)
    rows = []
    for site in args.sites.split(","):
        if args.sure_check:
            rows += sure_check(site, args.max_slices, prior, args.workdir, settings)
        else:
            rows += evaluate_site(site, methods, args.max_slices, prior, args.workdir, settings)
    command = "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = sure_markdown(rows, command) if args.sure_check else markdown(rows, command)
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
