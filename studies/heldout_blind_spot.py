"""Where the held-out loss is blind: the guard's chains' k-space error per column, against the full k-space.

    python studies/heldout_blind_spot.py --cell val4_knee_colin_4x --slices 1,3
    python studies/heldout_blind_spot.py --cell val4_knee_colin_4x --slices 1,3 --figure docs/results/figures/heldout_blind_spot.png

For each slice of a cell of ``studies/calibration_screen.py`` (its simulated val data and maps under ``--screen-out``
are reused), BiasRecon calibrates as the screen's row does (default ``norm_affine``, the matrix's sampler), and the
final guard's chains — each candidate ``t·γ`` and ``γ = 0``, run on ``y_Θv`` — are kept. Simulated files store the
fully sampled k-space, so each chain's error ``|F S x − y_full|²`` is known on every column: on the held-out
columns ``Λ_v`` (what the guard scores), on the columns the mask never sampled (what the image loses), and per
octile of ``|k_x|``. Records (``OUT/<cell>/<row>/<slice>.json``) hold the per-column errors; a rerun skips them.
Row-constant (1-D) masks only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_screen as screen  # noqa: E402  (the screen's cells, data and rows)

from recon.atomic import write_bytes, write_text  # noqa: E402
from recon.biasrecon import BiasRecon  # noqa: E402
from recon.coils import detect_acs  # noqa: E402
from recon.errors import InputError  # noqa: E402
from recon.jobs import run_main  # noqa: E402
from recon.methods import slice_scores  # noqa: E402
from recon.operators import Sense  # noqa: E402
from scores.samplers import TweedieSampler  # noqa: E402


def full_kspace(data: screen.Data, cell: screen.Cell, index: int, measured: torch.Tensor) -> torch.Tensor:
    """The slice's fully sampled k-space ``(C, H, W)`` on the scale of the measured (normalised) one."""
    sample = data.sample(cell, index)
    files = list((data.out / "data" / cell.name).glob(f"*/{sample.fname}"))
    if not files:
        raise InputError(f"{data.out / 'data' / cell.name}: no file {sample.fname}; run calibration_screen.py --prepare.")
    with h5py.File(files[0], "r") as f:
        full = torch.from_numpy(np.asarray(f["kspace"][0]))
    taken = (sample.mask != 0).expand_as(full)
    scale = (measured[taken] * full[taken].conj()).sum() / (full[taken].abs() ** 2).sum()
    return full * scale


def measure(data: screen.Data, cell: screen.Cell, row: str, index: int) -> dict:
    """Calibrate one slice, keep the guard's chains, and return their per-column errors and chain PSNRs."""
    sample, maps = data.sample(cell, index), data.maps(cell, index)
    if not bool(torch.equal(sample.mask, sample.mask[:1].expand_as(sample.mask))):
        raise InputError(f"{cell.name} slice {index}: key 'mask' varies along H, expected a row-constant (1-D) mask.")
    op = Sense(maps[None], sample.mask[None, None])
    settings, bands = screen.unit_settings(row, "heldout")
    optimizer = BiasRecon(data.prior(cell.prior), op, sample.kspace[None], settings, sampler=TweedieSampler(),
                          calibration_bands=bands)
    chains: list[torch.Tensor] = []
    x_step_chain = optimizer.x_step_chain

    def keeping_guard_chains(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # the guard's chains, kept
        x0, rest = x_step_chain(*args, **kwargs)
        if kwargs.get("phase") == "guard":
            chains.append(x0.detach().clone())
        return x0, rest

    optimizer.x_step_chain = keeping_guard_chains
    optimizer.calibrate()
    if optimizer.calibration is not None:
        optimizer.calibration.detach()
    full = full_kspace(data, cell, index, sample.kspace)
    every = Sense(maps[None], torch.ones_like(sample.mask)[None, None])
    names = [f"t={t:g}" for t in settings.guard_scales] + ["zero"]
    width = full.shape[-1]
    out = {"cell": cell.name, "row": row, "slice": index, "fname": sample.fname,
           "kx": (torch.arange(width) - width // 2).abs().tolist(),
           "acs": (detect_acs(sample.mask)[0] != 0).tolist(), "sampled": (sample.mask[0] != 0).tolist(),
           "heldout": (optimizer.val_lambda.reshape(-1, width).amax(0) != 0).tolist(),
           "kept": "zero" if optimizer.val_loss_best == optimizer.val_loss_zero else "gamma", "chains": {}}
    for name, x0 in zip(names, chains):
        error = every.A(x0)[0] - full
        out["chains"][name] = {"column_error": (error.real ** 2 + error.imag ** 2).sum(dim=(0, 1)).tolist(),
                               "heldout_loss": float(optimizer._loss(x0, optimizer.val_lambda)),
                               "psnr": slice_scores(sample, x0[0, 0])["reference"][0]}
    return out


def summary(record: dict) -> list[str]:
    """Per candidate: the ratio of its error to γ = 0's on Λ_v (what the guard sees), on the never-sampled columns
    (what the image loses), per |k_x| octile, and its chain's PSNR."""
    kx = np.array(record["kx"])
    heldout, sampled = np.array(record["heldout"]), np.array(record["sampled"])
    zero = np.array(record["chains"]["zero"]["column_error"])
    octile = np.minimum((kx / (kx.max() + 1) * 8).astype(int), 7)
    lines = [f"{record['cell']} slice {record['slice']} ({record['fname']}): held-out |kx| "
             f"{sorted(kx[heldout].tolist())}; never-sampled error share per |kx| octile "
             f"{[round(float(zero[~sampled & (octile == o)].sum() / zero[~sampled].sum()), 2) for o in range(8)]}"]
    for name, chain in record["chains"].items():
        err = np.array(chain["column_error"])
        per = [round(float(err[~sampled & (octile == o)].sum() / max(zero[~sampled & (octile == o)].sum(), 1e-30)), 2)
               for o in range(8)]
        lines.append(f"  {name:7s} chain PSNR {chain['psnr']:.2f} | Λv {err[heldout].sum() / zero[heldout].sum():.3f} "
                     f"| never sampled {err[~sampled].sum() / zero[~sampled].sum():.3f} | per octile {per}")
    return lines


def figure(records: list[dict], path: Path) -> None:
    """Per slice: each candidate's error over γ = 0's per column (never sampled: line; Λ_v: dots), the columns the
    mask samples marked."""
    from recon.figures import _png, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(6.2 * len(records), 4.2), squeeze=False)
    for ax, record in zip(axes[0], records):
        kx = np.array(record["kx"])
        order = np.argsort(kx, kind="stable")
        heldout, sampled, acs = (np.array(record[k]) for k in ("heldout", "sampled", "acs"))
        zero = np.array(record["chains"]["zero"]["column_error"])
        for name, chain in record["chains"].items():
            if name == "zero":
                continue
            ratio = np.array(chain["column_error"]) / np.maximum(zero, 1e-30)
            never = order[~sampled[order]]
            ks = np.unique(kx[never])
            mean = [ratio[never][kx[never] == k].mean() for k in ks]
            line, = ax.plot(ks, mean, lw=1.2, label=f"{name}: never sampled")
            ax.plot(kx[heldout], ratio[heldout], "o", color=line.get_color(), ms=4)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.axvspan(0, kx[acs].max() + 0.5, color="0.85", label="fully sampled centre")
        ax.plot(kx[sampled & ~acs], np.full(int((sampled & ~acs).sum()), 0.02), "|", color="k", ms=10,
                transform=ax.get_xaxis_transform(), label="sampled columns")
        ax.set_xlim(0, kx.max() + 1)
        ax.set_xlabel("|k_x| (columns from the centre; dots: the held-out columns Λ_v)")
        ax.set_ylabel("error / error at γ = 0 (guard chain)")
        ax.set_title(f"{record['cell']}, slice {record['slice']}: guard kept {record['kept']}")
        ax.legend(fontsize=7)
    write_bytes(path, _png(fig))


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", default="val4_knee_colin_4x", choices=sorted(screen.CELLS))
    parser.add_argument("--slices", default="1,3", help="comma-separated slice indices of the cell")
    parser.add_argument("--row", default="norm_affine", help="a calibration_screen row (family and settings)")
    parser.add_argument("--screen-out", type=Path, default=Path("out/calibration_screen"))
    parser.add_argument("--out", type=Path, default=Path("out/heldout_blind_spot"))
    parser.add_argument("--figure", type=Path, help="draw the per-column error ratios to this PNG")
    args = parser.parse_args(argv)
    if problem := screen.row_problem(args.row):
        raise InputError(f"command line: key '--row' is {args.row!r}: {problem}.")
    cell, data = screen.CELLS[args.cell], screen.Data(args.screen_out)
    try:
        slices = [int(s) for s in args.slices.split(",")]
    except ValueError:
        raise InputError(f"command line: key '--slices' is {args.slices!r}, expected comma-separated integers.") from None
    if any(not 0 <= s < cell.slices for s in slices):
        raise InputError(f"command line: key '--slices' is {args.slices!r}, expected indices below {cell.slices}.")
    records = []
    for index in slices:
        path = args.out / cell.name / args.row.replace("/", "_") / f"{index:03d}.json"
        if not path.exists():
            write_text(path, json.dumps(measure(data, cell, args.row, index)))
        records.append(json.loads(path.read_text()))
        print("\n".join(summary(records[-1])))
    if args.figure is not None:
        figure(records, args.figure)
        print(f"wrote {args.figure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; 2 with one ``error:`` line on bad input."""
    return run_main(_run, argv, ())


if __name__ == "__main__":
    sys.exit(main())
