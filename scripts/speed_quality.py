"""The speed–quality curve: seconds per slice and PSNR / SSIM over noise levels × posterior samples.

    python scripts/speed_quality.py [--cases knee,head] [--device cpu[,cuda]] [--levels 8,20,40,60]
        [--samples 1,2,4] [--biasrecon-points 8x1,40x2,20x1,40x1,20x2,8x2] [--out out/speed_quality]
        [--record docs/results/speed_quality.md] [--report-only]

Cases (one val slice each, at the images' own matrix, fastMRI's random 1-D 4× mask, 8 simulated coils):
``knee`` — ``stanford_knee`` val (P11), the ``stanford_knee`` prior; ``head`` — ``siat_head_t2`` val
(slice 71), the ``stanford_knee`` prior too (the head prior is not shipped; on the head val split the knee
prior alone scored as well as it, ``docs/results/priors.md``). Methods: the unadapted prior (``unadapted``:
fixed λ) over ``--levels`` × ``--samples``; BiasRecon (``biasrecon``: the adapt config's ``biasrecon``
section, SURE's λ) at ``--biasrecon-points`` (levels × samples, measured in the order given: it costs 10–20×
the unadapted prior per level on a CPU); SENSE-L2, and TV and L1-wavelet
at their oracle λ (the best of ``--oracle-grid`` on the slice, against the clean reference), as
horizontal lines. Everything else is the shipped adapt config's (``configs/biasrecon/default.yaml``).

One torch thread per process (``--threads``), sensitivity maps (ESPIRiT) excluded from the seconds.
The unadapted K-sample point averages chains with seeds 0…K−1 (what ``num_samples=K`` computes), its
seconds the sum of theirs. Every point is a file under ``OUT/points`` (chains under ``OUT/chains``): a
rerun skips what is done, so an interrupted sweep continues, and several processes may run different
``--cases``. ``--device cpu,cuda`` measures both in the same run (the GPU's points: ``cuda``). Then
``--record`` gets the tables, the knee of each prior method's curve (its cheapest setting within 0.2 dB
of its best PSNR on every case) and the figure ``docs/results/figures/speed_quality.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from recon.atomic import write_text
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.coils import sensitivity_maps
from recon.config import DEFAULT_CONFIG, load_config, method_settings
from recon.data import Sample, load_site, site_dataset
from recon.errors import InputError
from recon.jobs import run_main
from recon.methods import parse_lambdas, prior_settings, run_baseline, slice_scores, tune_lambda
from recon.operators import Sense
from recon.speed_quality import CurvePoint, PointStore, curve_figure, curve_table, knee_point, mean_of_chains
from scores.checkpoints import CheckpointError
from scores.priors import load_prior
from scores.samplers import TweedieSampler

__all__ = ["CASES", "Case", "measure_case", "report", "main"]


@dataclass(frozen=True)
class Case:
    """A slice of the curve: the site (val split), its index in that split, the prior."""

    site: str
    index: int
    prior: str
    label: str
    overrides: tuple[str, ...] = ("data.split=val",)


CASES: dict[str, Case] = {
    "knee": Case("stanford_knee", 0, "stanford_knee", "`stanford_knee` val slice P11 (320×256), knee prior"),
    "head": Case("siat_head_t2", 0, "stanford_knee", "`siat_head_t2` val slice 71 (270×256), knee prior"),
}
ORACLE_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
FIGURE = Path("docs/results/figures/speed_quality.png")
SAMPLER = TweedieSampler()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _open(case: Case, workdir: Path) -> Sample:
    dataset = site_dataset(load_site(case.site, list(case.overrides)), workdir=workdir, seed=0)
    return dataset[case.index]


def _prior_run(prior, op: Sense, y: torch.Tensor, settings: BiasReconSettings,
               device: torch.device) -> tuple[torch.Tensor, float, float]:
    """One BiasRecon run: ``(image (H, W) on the CPU, seconds, λ)``."""
    _sync(device)
    start = time.perf_counter()
    result = BiasRecon(prior, op, y, settings, sampler=SAMPLER).run(progress=True)
    _sync(device)
    return result.image[0, 0].cpu(), time.perf_counter() - start, float(result.lam)


def measure_case(name: str, device: torch.device, store: PointStore, base: BiasReconSettings,
                 levels: list[int], samples: list[int], br_points: list[tuple[int, int]],
                 oracle_grid: tuple[float, ...]) -> None:
    """Every point of one case on one device that the store does not hold yet (cheapest first)."""
    case = CASES[name]
    sample = _open(case, store.folder / "data")
    maps = sensitivity_maps(sample)
    dev = device.type

    def scored(method: str, lv: int, k: int, image: torch.Tensor, seconds: float, params: str = "") -> CurvePoint:
        psnr, ssim = slice_scores(sample, image)["reference"]
        point = store.put(CurvePoint(dev, name, method, lv, k, seconds, psnr, ssim, params))
        print(f"{dev} {name:5s} {method:10s} levels {lv:3d} samples {k}: {psnr:6.2f} dB  SSIM {ssim:.3f}  "
              f"{seconds:8.1f} s/slice  {params}", flush=True)
        return point

    if dev == "cpu":  # the classical methods run on the CPU (sigpy); their lines are the same on every panel
        if store.get(f"cpu_{name}_sense_L0_K0") is None:
            start = time.perf_counter()
            image = run_baseline("sense", sample, maps).image
            scored("sense", 0, 0, image, time.perf_counter() - start)
        for method in ("tv", "l1wavelet"):
            if store.get(f"cpu_{name}_{method}_L0_K0") is None:
                start = time.perf_counter()
                best, table = tune_lambda(method, [sample], [maps], grid=oracle_grid, against="reference")
                seconds = (time.perf_counter() - start) / len(oracle_grid)
                image = next(t for t in table if t.lam == best).images[0]
                edge = ", grid edge" if best in (min(oracle_grid), max(oracle_grid)) else ""
                scored(method, 0, 0, image, seconds, f"oracle λ {best:g}{edge}")

    prior = load_prior(case.prior, device=device).model
    op = Sense(maps[None].to(device), sample.mask[None, None].to(device))
    y = sample.kspace[None].to(device)
    if dev == "cuda":  # warm-up: kernels and cuFFT plans are not part of the seconds
        _prior_run(prior, op, y, replace(prior_settings(base, "unadapted"), num_steps=2), device)

    unadapted = prior_settings(base, "unadapted")
    for lv in sorted(levels):
        todo = [k for k in sorted(samples) if store.get(f"{dev}_{name}_unadapted_L{lv}_K{k}") is None]
        if not todo:
            continue
        chains, seconds = [], []
        for seed in range(max(todo)):
            chain_name = f"{dev}_{name}_L{lv}_seed{seed}"
            stored = store.chain(chain_name)
            if stored is None:
                image, sec, _ = _prior_run(prior, op, y, replace(unadapted, num_steps=lv, num_samples=1,
                                                                 seed=base.seed + seed), device)
                store.put_chain(chain_name, image, sec)
                stored = (image, sec)
            chains.append(stored[0])
            seconds.append(stored[1])
        for k in todo:
            scored("unadapted", lv, k, mean_of_chains(chains, k), sum(seconds[:k]), f"λ {unadapted.lam:g}")

    for lv, k in br_points:
        if store.get(f"{dev}_{name}_biasrecon_L{lv}_K{k}") is None:
            image, sec, lam = _prior_run(prior, op, y, replace(base, num_steps=lv, num_samples=k), device)
            scored("biasrecon", lv, k, image, sec, f"SURE λ {lam:.3g}")


def report(store: PointStore, record: Path, figure: Path, command: str, tolerance: float = 0.2) -> str:
    """The tables, the knees and the figure of every stored point; writes ``record`` (markdown) and ``figure``."""
    points = store.points()
    if not points:
        raise InputError(f"{store.folder}: key 'points' is empty, expected measured points (run without --report-only).")
    curve_figure(points, figure)
    knees = []
    for device in sorted({p.device for p in points}):
        for method in ("unadapted", "biasrecon"):
            knee = knee_point(points, method, tolerance, device)
            if knee is not None:
                knees.append(f"- {device}, {method}: **{knee[0]} levels × {knee[1]} samples** (cheapest within "
                             f"{tolerance} dB of the method's best PSNR on every case)")
    cases = sorted({p.case for p in points})
    text = (f"Measured {_dt.date.today().isoformat()}; {platform.machine()} CPU, "
            f"{torch.get_num_threads()} torch thread(s) per process; torch {torch.__version__}.\n"
            f"Command: `{command}`\n\n"
            + "".join(f"- `{c}`: {CASES[c].label}\n" for c in cases if c in CASES)
            + f"\n![speed–quality curve]({Path('figures') / figure.name})\n\nKnees:\n\n" + "\n".join(knees) + "\n\n"
            + curve_table(points, tolerance))
    write_text(record, text)
    return text


def _ints(text: str, key: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"command line: key '{key}' is {text!r}, expected a comma list of positive integers.") from None
    if not values or min(values) < 1:
        raise InputError(f"command line: key '{key}' is {text!r}, expected a comma list of positive integers.")
    return values


def _points(text: str) -> list[tuple[int, int]]:
    """``"8x1,40x2"`` → ``[(8, 1), (40, 2)]``."""
    try:
        points = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) < 1 for p in points):
        raise InputError(f"command line: key '--biasrecon-points' is {text!r}, expected a comma list of LEVELSxSAMPLES "
                         f"like 8x1,40x2.")
    return points


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="knee,head", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--device", default="cpu", help="comma list of cpu, cuda (cuda: when available)")
    parser.add_argument("--levels", default="8,20,40,60", help="noise levels of the unadapted prior's grid")
    parser.add_argument("--samples", default="1,2,4", help="posterior samples of the unadapted prior's grid")
    parser.add_argument("--biasrecon-points", default="8x1,40x2,20x1,40x1,20x2,8x2",
                        help="BiasRecon's points, levels x samples, in the order measured (default %(default)s)")
    parser.add_argument("--oracle-grid", default=",".join(f"{g:g}" for g in ORACLE_GRID),
                        help="λ tried for the oracle TV / L1-wavelet (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="adapt config YAML (its biasrecon section)")
    parser.add_argument("--out", type=Path, default=Path("out/speed_quality"), help="points, chains and data")
    parser.add_argument("--record", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="the figure (default %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="only write the report of the stored points")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise InputError(f"command line: key '--cases' is {args.cases!r}, expected a comma list of {', '.join(CASES)}.")
    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    if not devices or any(d not in ("cpu", "cuda") for d in devices):
        raise InputError(f"command line: key '--device' is {args.device!r}, expected a comma list of cpu, cuda.")
    if "cuda" in devices and not torch.cuda.is_available():
        print("note: no CUDA device here; measuring the CPU only", flush=True)
        devices = [d for d in devices if d != "cuda"] or ["cpu"]
    config = load_config(args.config, [])
    base = method_settings(config, "biasrecon")
    store = PointStore(args.out)
    if not args.report_only:
        grid = tuple(parse_lambdas(args.oracle_grid, "command line: key '--oracle-grid'", positive=True))
        for device in devices:
            for name in cases:
                measure_case(name, torch.device(device), store, base, _ints(args.levels, "--levels"),
                             _ints(args.samples, "--samples"), _points(args.biasrecon_points), grid)
    if args.record is not None:
        command = "python scripts/speed_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(report(store, args.record, args.figure, command))
        print(f"wrote {args.record} and {args.figure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; 2 with one ``error:`` line on bad input."""
    return run_main(_run, argv, (CheckpointError, InputError))


if __name__ == "__main__":
    sys.exit(main())
