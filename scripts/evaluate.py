"""Quality table: every method on a site's slices, PSNR / SSIM as mean ± std, seconds per slice.

    python scripts/evaluate.py --sites source_brain,unseen_center --max-slices 8 \
        --methods all --record docs/results/quality_runs/NAME.md

Methods: the classical baselines (``zero_filled``, ``sense``; ``l1wavelet`` and ``tv`` with λ tuned
for the best mean PSNR on the very slices evaluated, the "best-tuned" baseline), the bundled prior
with the fast Tweedie sampler and near-hard data consistency (``prior_dc``: ``scores.samplers``,
prox with λ = 1e-4), and the BiasRecon family through :class:`recon.biasrecon.BiasRecon`:
``unadapted`` (fixed λ), ``unadapted_sure`` (= BiasRecon without calibration), ``biasrecon``,
``biasrecon_nosure`` and ``finetune`` (every weight, same loss and steps). Sensitivity maps are
ESPIRiT from each slice's centre (``recon.baselines.sensitivity_maps``), shared by every method.
Metrics are per slice (fastMRI's definitions, ``maxval`` = the volume's stored max), then mean ± std.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scores  # noqa: E402
from recon.atomic import write_text  # noqa: E402
from recon.baselines import center_crop, run_baseline, sensitivity_maps, tune_lambda  # noqa: E402
from recon.biasrecon import BiasRecon, BiasReconSettings  # noqa: E402
from recon.data import load_site, site_dataset  # noqa: E402
from recon.dc import Prox  # noqa: E402
from recon.errors import InputError  # noqa: E402
from recon.metrics import psnr, ssim  # noqa: E402
from recon.operators import Sense, conjugate_gradient  # noqa: E402
from scores.checkpoints import load_checkpoint  # noqa: E402
from scores.samplers import sample_tweedie_dc  # noqa: E402

CLASSICAL = ["zero_filled", "sense", "l1wavelet", "tv"]
PRIOR = ["prior_dc", "unadapted", "unadapted_sure", "biasrecon", "biasrecon_nosure", "finetune"]
BIASRECON = {
    "unadapted": dict(adapt="none", sure=False),
    "unadapted_sure": dict(adapt="none", sure=True),
    "biasrecon": dict(adapt="gamma", sure=True),
    "biasrecon_nosure": dict(adapt="gamma", sure=False),
    "finetune": dict(adapt="full", sure=True),
}
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
DEFAULT_PRIOR = Path(scores.__file__).resolve().parent / "weights" / "source_brain.safetensors"


def _slice_metrics(target: torch.Tensor, image: torch.Tensor, maxval: float) -> tuple[float, float]:
    pred = center_crop(image.abs(), target.shape[-2:]).numpy()[None].astype(np.float32)
    gt = target.numpy()[None].astype(np.float32)
    return psnr(gt, pred, maxval), ssim(gt, pred, maxval)


def _prior_dc(prior, op: Sense, y: torch.Tensor, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """The fast sampler with near-hard data consistency, started from the SENSE estimate at σ = 1."""
    sigmas = np.geomspace(1.0, 0.01, steps).tolist()
    g = torch.Generator().manual_seed(seed)
    x_sense = conjugate_gradient(op.normal, op.A_adjoint(y), 1e-3, max_iter=10).x
    noise = torch.view_as_complex(torch.randn(tuple(x_sense.shape) + (2,), generator=g))
    return sample_tweedie_dc(prior, tuple(x_sense.shape), sigmas, dc=Prox(op, y, 1e-4, max_iter=10),
                             generator=g, x_init=x_sense + sigmas[0] * noise)


def evaluate_site(site_name: str, methods: list[str], max_slices: int, prior_path: Path, workdir: Path,
                  settings: dict) -> list[dict]:
    site = load_site(site_name)
    dataset = site_dataset(site, workdir=workdir, seed=0)
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

    for method in [m for m in methods if m in CLASSICAL]:
        params, label = {}, ""
        if method in ("l1wavelet", "tv"):
            best, _ = tune_lambda(method, samples, maps, grid=GRID)
            params, label = {"lam": best}, f"λ={best:g} (best of {len(GRID)} on these slices)"
        start = time.perf_counter()
        images = [run_baseline(method, s, m, **params).image for s, m in zip(samples, maps)]
        record(method, images, time.perf_counter() - start, label)

    prior_methods = [m for m in methods if m in PRIOR]
    if not prior_methods:
        return rows
    prior, _ = load_checkpoint(prior_path)
    for p in prior.parameters():
        p.requires_grad_(False)
    y = torch.stack([s.kspace for s in samples])
    op = Sense(torch.stack(maps), torch.stack([s.mask for s in samples])[:, None])
    for method in prior_methods:
        start = time.perf_counter()
        if method == "prior_dc":
            with torch.no_grad():
                image = _prior_dc(prior, op, y)
            label = "50 steps, λ=1e-4"
        else:
            st = BiasReconSettings(**{**settings, **BIASRECON[method]})
            result = BiasRecon(prior, op, y, st).run(progress=True)
            image = result.image
            label = f"λ={result.lam:g}" + (" (SURE)" if st.sure else "")
            if st.adapt != "none":
                label += f", held-out {result.val_loss_zero:.4f}→{result.val_loss_best:.4f}"
        record(method, list(image[:, 0]), time.perf_counter() - start, label)
    return rows


def sure_check(site_name: str, max_slices: int, prior_path: Path, workdir: Path, settings: dict,
               grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)) -> list[dict]:
    """SURE's λ against a fixed-λ grid, scored against the stored (noisy) targets and the noiseless truth.

    The noiseless truth is the same simulation (same subjects, deformations, coils, masks) with
    ``noise.sigma = 1e-7``; only the noise differs, so its RSS target is the clean image.
    """
    noisy = site_dataset(load_site(site_name), workdir=workdir / "noisy", seed=0)
    clean = site_dataset(load_site(site_name, ["noise.sigma=1e-7"]), workdir=workdir / "noiseless", seed=0)
    count = min(max_slices, len(noisy))
    samples, truths = [noisy[i] for i in range(count)], [clean[i] for i in range(count)]
    maps = torch.stack([sensitivity_maps(s) for s in samples])
    op = Sense(maps, torch.stack([s.mask for s in samples])[:, None])
    y = torch.stack([s.kspace for s in samples])
    prior, _ = load_checkpoint(prior_path)
    for p in prior.parameters():
        p.requires_grad_(False)
    rows = []
    runs = [(f"fixed λ={lam:g}", dict(adapt="none", sure=False, lam=lam)) for lam in grid]
    runs.append(("SURE", dict(adapt="none", sure=True, lam_grid=grid)))
    for label, kw in runs:
        result = BiasRecon(prior, op, y, BiasReconSettings(**{**settings, **kw})).run()
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
    head = (f"Command: `{command}`; {_dt.date.today().isoformat()}.\n\n"
            "| site | λ rule | λ | PSNR / SSIM vs stored (noisy RSS) target | PSNR / SSIM vs noiseless truth |\n"
            "|---|---|---:|---|---|\n")
    return head + "".join(f"| {r['site']} | {r['method']} | {r['lam']:g} | {r['noisy'][0]:.2f} / {r['noisy'][1]:.3f} | "
                          f"{r['noiseless'][0]:.2f} / {r['noiseless'][1]:.3f} |\n" for r in rows)


def markdown(rows: list[dict], command: str) -> str:
    head = (f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
            f"{_dt.date.today().isoformat()}.\nCommand: `{command}`\n\n"
            "| site | method | PSNR (dB) | SSIM | s/slice | tuned / chosen |\n|---|---|---|---|---:|---|\n")
    body = "".join(
        f"| {r['site']} | {r['method']} | {r['psnr'][0]:.2f} ± {r['psnr'][1]:.2f} | {r['ssim'][0]:.3f} ± "
        f"{r['ssim'][1]:.3f} | {r['seconds']:.2f} | {r['params']} |\n" for r in rows)
    return head + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="source_brain,unseen_center")
    parser.add_argument("--methods", default="all", help="comma list or 'all'")
    parser.add_argument("--max-slices", type=int, default=8)
    parser.add_argument("--prior", type=Path, default=DEFAULT_PRIOR)
    parser.add_argument("--workdir", type=Path, default=Path("out/evaluate_data"))
    parser.add_argument("--record", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--sure-check", action="store_true",
                        help="SURE's λ vs a 5-point fixed-λ grid, against noisy targets and the noiseless truth")
    parser.add_argument("overrides", nargs="*", help="BiasReconSettings overrides, e.g. num_steps=30")
    args = parser.parse_args(argv)
    methods = CLASSICAL + PRIOR if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in CLASSICAL + PRIOR]
    try:
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; expected some of {CLASSICAL + PRIOR}")
        settings = {}
        for item in args.overrides:
            key, _, value = item.partition("=")
            if key not in BiasReconSettings.__dataclass_fields__ or not value:
                raise InputError(f"override {item!r}: expected KEY=VALUE with KEY a BiasReconSettings field")
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value  # a bare word, e.g. adapt=gamma
            settings[key] = tuple(parsed) if key == "lam_grid" else parsed
        rows = []
        for site in args.sites.split(","):
            if args.sure_check:
                rows += sure_check(site, args.max_slices, args.prior, args.workdir, settings)
            else:
                rows += evaluate_site(site, methods, args.max_slices, args.prior, args.workdir, settings)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = sure_markdown(rows, command) if args.sure_check else markdown(rows, command)
    print(table)
    if args.record is not None:
        write_text(args.record, table)
        print(f"wrote {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
