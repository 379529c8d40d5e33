"""The calibration screen (issue #24): every calibration family's oracle bound and self-supervised result on val slices.

Each unit is one (cell, family, loss, slice): BiasRecon with ``calibration_family`` = the family and
``calib_loss`` = ``reference`` (the oracle: γ fitted to the clean reference, the family's bound) or ``heldout``
(the method) — or ``oracle_theta``: the oracle's loss fed only the self-supervised run's calibration data
``y_Θc`` (its iterate and θ-steps), which splits the gap between bound and method into what holding data out
costs and what the held-out loss costs — or ``pooled`` / ``oracle_pooled``: one γ fitted by the method's (the oracle's)
loss on a batch of all the cell's slices at once (the site's shift, as ``mode=site``), each slice then reconstructed
with it fixed — everything else the matrix's settings (20 levels, 1 sample, SURE, the guard); ``unadapted`` is the
prior as trained with SURE. One JSON record per unit under ``--out``; units already recorded are skipped and two
processes share the list through claim files, so the study resumes and runs in parallel::

    python studies/calibration_screen.py --prepare                      # simulate the val slices and their maps
    OMP_NUM_THREADS=1 python studies/calibration_screen.py &            # twice: two processes share the units
    python studies/calibration_screen.py --report                       # the tables (docs/results/calibration_study.md)

Cells (val splits only; the test slices are scored once, by the matrix): the MNI brain prior (``source_brain``) on
the real knees at 4x and 8x, the knee prior on the real T1 brain (``colin27_t1``) at 4x and 8x, and the knee and
Colin 27 priors on the EPI and the MNI template, whose sigpy-square ESPIRiT maps fail the misfit gate. A cell's
``maps`` is ESPIRiT's calibration block (``recon.coils.MAP_BLOCKS``; ``square`` unless its name ends in ``_rect``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon.atomic import write_bytes, write_text
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.adapt.families import CalibratedPrior, CalibrationShape
from recon.config import settings_from_dotlist
from recon.errors import InputError
from recon.data.sites import load_site, site_dataset
from recon.methods import FINETUNE_LR, reference_stack, slice_scores
from recon.openworld import cached_maps, claim, release
from recon.operators import Sense
from scores.priors import load_prior, resolve_prior
from scores.samplers import TweedieSampler


@dataclass(frozen=True)
class Cell:
    name: str
    prior: str
    site: str
    overrides: tuple[str, ...]
    slices: int
    maps: str = "square"  # ESPIRiT's calibration block (recon.coils.MAP_BLOCKS)


CELLS = {
    "brain_knee_4x": Cell("brain_knee_4x", "source_brain", "stanford_knee", ("data.split=val",), 2),
    "brain_knee_8x": Cell("brain_knee_8x", "source_brain", "stanford_knee",
                          ("data.split=val", "acquisition.acceleration=8"), 2),
    # tuning slices: the knee train split (P1-P4), which the brain prior never saw, for more than the 2 val slices
    "tune_brain_knee_4x": Cell("tune_brain_knee_4x", "source_brain", "stanford_knee", ("data.split=train",), 4),
    "knee_colin_4x": Cell("knee_colin_4x", "stanford_knee", "colin27_t1", ("data.split=val",), 2),
    # the real shift of the real-anatomy matrix (knee prior -> Colin 27, headroom 1.85 dB): all 4 val slices
    "val4_knee_colin_4x": Cell("val4_knee_colin_4x", "stanford_knee", "colin27_t1", ("data.split=val",), 4),
    # the matrix's failing cell (knee prior -> Colin 27 8x, where BiasRecon ended below the unadapted prior), on val;
    # the matrix's centre at 8x (open_world.yaml): 6 % of 181 columns
    "val4_knee_colin_8x": Cell("val4_knee_colin_8x", "stanford_knee", "colin27_t1",
                               ("data.split=val", "acquisition.acceleration=8", "acquisition.center_fraction=0.06"), 4),
    # the domains whose square-ESPIRiT maps fail the misfit gate (val slices), with the square and the rectangular
    # calibration block (recon.coils.acs_rectangle): the matrix's EPI (random 1-D, 8 of 96 centre columns) and the
    # MNI152 template brain (10 of 128)
    **{f"val4_{prior_tag}_{tag}_4x{suffix}": Cell(f"val4_{prior_tag}_{tag}_4x{suffix}", prior, site,
                                                  ("data.split=val", *extra), 4, maps)
       for prior_tag, prior in (("knee", "stanford_knee"), ("colin", "colin27_t1"))
       for tag, site, extra in (("epi", "real_epi", ("acquisition.mask_type=random_1d",
                                                     "acquisition.center_fraction=null")),
                                ("template", "source_brain", ("acquisition.mask_type=random_1d",
                                                              "acquisition.center_fraction=null")))
       for suffix, maps in (("", "square"), ("_rect", "rectangle"))},
    # the rectangular calibration on cells whose square maps pass the gate (the control)
    **{f"{name}_rect": Cell(f"{name}_rect", *fields, maps="rectangle")
       for name, fields in (("tune_brain_knee_4x", ("source_brain", "stanford_knee", ("data.split=train",), 4)),
                            ("val4_knee_colin_4x", ("stanford_knee", "colin27_t1", ("data.split=val",), 4)),
                            ("val4_knee_colin_8x", ("stanford_knee", "colin27_t1", ("data.split=val",
                                                    "acquisition.acceleration=8", "acquisition.center_fraction=0.06"),
                                                    4)))},
    # the final table: the matrix's test slices (the first 6 of the test split), scored once
    "test_brain_knee_4x": Cell("test_brain_knee_4x", "source_brain", "stanford_knee", (), 6),
    "test_brain_knee_8x": Cell("test_brain_knee_8x", "source_brain", "stanford_knee",
                               ("acquisition.acceleration=8",), 6),
    # the same test slices with the rectangular ESPIRiT block (the library's maps since 2026-12-08)
    "test_brain_knee_4x_rect": Cell("test_brain_knee_4x_rect", "source_brain", "stanford_knee", (), 6, "rectangle"),
    "test_brain_knee_8x_rect": Cell("test_brain_knee_8x_rect", "source_brain", "stanford_knee",
                                    ("acquisition.acceleration=8",), 6, "rectangle"),
}
# the matrix's sampler (configs/matrix/open_world.yaml); the calibration at every level, as every row before 2026-12-07's
# seventh session was measured (the library's default since then, calibrate_below 0.1, is the row
# "norm_affine:calibrate_below=0.1")
SETTINGS = BiasReconSettings(num_steps=20, num_samples=1, calibrate_below=None)
# name -> (family, bands of the bands family); "bands" at 3 bands is the first version of the method; "finetune" fits
# every weight (adapt full, Adam 1e-5: the matrix's full fine-tuning baseline)
FAMILY_ROWS = {
    "bands": ("bands", 3), "bands5": ("bands", 5), "conv_gain": ("conv_gain", 3), "norm_affine": ("norm_affine", 3),
    "freeu": ("freeu", 3), "residual_bands": ("residual_bands", 3), "sigma_in": ("sigma_in", 3),
    "sigma_residual": ("sigma_residual", 3), "finetune": ("full", 3),
}
LOSSES = ("oracle", "heldout", "oracle_theta", "pooled", "oracle_pooled")
# pooled losses: one γ fitted on all the cell's slices at once (the site's shift, mode site), then each slice's
# reconstruction with that γ fixed; the loss each pooled calibration runs
POOLED = {"pooled": "heldout", "oracle_pooled": "reference"}
ORDER = ["bands", "sigma_in", "residual_bands", "conv_gain", "norm_affine", "freeu", "bands5", "sigma_residual"]


def row_settings(row: str) -> tuple[str, dict]:
    """A row's family name and its settings overrides: ``family[@lr][+kK][:key=value]...`` — another Adam step,
    ``K`` guard folds, any other :class:`BiasReconSettings` field (a list as ``a/b/c``), e.g.
    ``norm_affine:split_ratio=0.25``, ``norm_affine:guard_scales=0.25/0.5/1/1.5``."""
    head, *pairs = row.split(":")
    head, _, folds = head.partition("+k")
    name, _, lr = head.partition("@")
    change: dict = {}
    if lr:
        change["lr"] = float(lr)
    if folds:
        change["guard_splits"] = int(folds)
    for pair in pairs:  # read through the biasrecon schema (recon.config), a list's "a/b/c" as "[a,b,c]"
        key, _, value = pair.partition("=")
        item = f"{key}=[{value.replace('/', ',')}]" if "/" in value else pair
        change[key] = getattr(settings_from_dotlist([item], where=f"row {row!r}"), key)
    return name, change


def default_units(cells: list[str], rows: list[str], losses: list[str]) -> list[tuple[str, str, str, int]]:
    """Units in working order: per cell, the unadapted prior, then each row's oracle (and self-supervised) run."""
    out = []
    for c in cells:
        n = CELLS[c].slices
        out += [(c, "unadapted", "none", s) for s in range(n)]
        for loss in losses:
            for row in rows:
                out += [(c, row, loss, s) for s in range(n)]
    return out


def record_path(out: Path, unit: tuple[str, str, str, int]) -> Path:
    cell, row, loss, s = unit
    return out / "records" / cell / f"{row.replace('/', '_')}__{loss}" / f"{s:03d}.json"


class Data:
    def __init__(self, out: Path) -> None:
        self.out, self.cache, self.priors = out, {}, {}

    def sample(self, cell: Cell, index: int):
        if cell.name not in self.cache:
            site = load_site(cell.site, list(cell.overrides))
            self.cache[cell.name] = site_dataset(site, workdir=self.out / "data" / cell.name, seed=0)
        return self.cache[cell.name][index]

    def maps(self, cell: Cell, index: int) -> torch.Tensor:
        return cached_maps(self.out / "maps" / cell.name / f"{index:03d}.pt", lambda: self.sample(cell, index),
                           block=cell.maps)

    def prior(self, name: str):
        if name not in self.priors:
            self.priors[name] = load_prior(resolve_prior(name)).model
        return self.priors[name]


def unit_settings(row: str, loss: str) -> tuple[BiasReconSettings, int]:
    """A unit's settings and the bands of its calibration (3 unless the row's family says otherwise)."""
    if row == "unadapted":
        return dataclasses.replace(SETTINGS, adapt="none"), 3
    name, change = row_settings(row)
    family, bands = FAMILY_ROWS[name]
    change = ({"adapt": "full", "lr": FINETUNE_LR} if family == "full" else
              {"adapt": "gamma", "calibration_family": family}) | change
    calib_loss = POOLED.get(loss, "heldout" if loss == "heldout" else "reference")
    return dataclasses.replace(SETTINGS, **change, calib_loss=calib_loss), bands


def pooled_problem(row: str, loss: str) -> str | None:
    """Why (row, loss) cannot run, if the loss pools a γ and the row calibrates no γ (full fine-tuning, none)."""
    adapt = unit_settings(row, loss)[0].adapt
    if loss in POOLED and adapt != "gamma":
        return f"{row!r} has adapt={adapt!r}, but loss {loss!r} pools a γ: expected a calibration family"
    return None


def pooled_gamma(data: Data, cell: Cell, row: str, loss: str) -> dict:
    """The pooled γ of (cell, row, loss): BiasRecon's calibration (its θ-steps and guard) on a batch of all the
    cell's slices, computed once and kept as ``gamma.pt`` beside the unit records (another process waits for it).
    Returns ``{"gamma", "seconds", "val_loss_zero", "val_loss_best", "skipped"}``."""
    path = record_path(data.out, (cell.name, row, loss, 0)).parent / "gamma.pt"
    while not path.exists():
        if not claim(path):
            time.sleep(10)  # another process is calibrating it
            continue
        if path.exists():  # finished between the check and the claim
            release(path)
            break
        try:
            if problem := pooled_problem(row, loss):
                raise InputError(f"row {problem}")
            settings, bands = unit_settings(row, loss)
            samples = [data.sample(cell, s) for s in range(cell.slices)]
            maps = torch.stack([data.maps(cell, s) for s in range(cell.slices)])
            op = Sense(maps, torch.stack([s.mask for s in samples])[:, None])
            reference = reference_stack(samples) if settings.calib_loss == "reference" else None
            start = time.perf_counter()
            optimizer = BiasRecon(data.prior(cell.prior), op, torch.stack([s.kspace for s in samples]), settings,
                                  sampler=TweedieSampler(), calibration_bands=bands, reference=reference)
            try:
                optimizer.calibrate()
            finally:
                if optimizer.calibration is not None:
                    optimizer.calibration.detach()
            buffer = io.BytesIO()  # written whole (temp file and rename): a waiting process never reads half of it
            torch.save({"gamma": optimizer.calibration.gamma.detach().clone(), "seconds": time.perf_counter() - start,
                        "val_loss_zero": optimizer.val_loss_zero, "val_loss_best": optimizer.val_loss_best,
                        "skipped": optimizer.calibration_skipped}, buffer)
            write_bytes(path, buffer.getvalue())
        finally:
            release(path)
    return torch.load(path)


def run(data: Data, unit: tuple[str, str, str, int]) -> dict:
    cell_name, row, loss, s = unit
    cell = CELLS[cell_name]
    sample, maps = data.sample(cell, s), data.maps(cell, s)
    op = Sense(maps[None], sample.mask[None, None])
    settings, bands = unit_settings(row, loss)
    prior, pooled = data.prior(cell.prior), None
    if loss in POOLED:  # the cell's pooled γ, fixed: this slice's reconstruction only
        pooled = pooled_gamma(data, cell, row, loss)
        shape = CalibrationShape(settings.calibration_family, bands=bands,
                                 sigma_range=(settings.sigma_start, settings.sigma_end), below=settings.calibrate_below)
        prior = CalibratedPrior(prior, pooled["gamma"], shape)
        settings = dataclasses.replace(settings, adapt="none")
    reference = reference_stack([sample]) if settings.calib_loss == "reference" and settings.adapt != "none" else None
    start = time.perf_counter()
    theta = None
    if loss == "oracle_theta":  # the self-supervised run's calibration data y_Θc (its constructor draws the split)
        twin = BiasRecon(data.prior(cell.prior), op, sample.kspace[None],
                         dataclasses.replace(settings, calib_loss="heldout"), sampler=TweedieSampler(),
                         calibration_bands=bands)
        theta = (twin.calib_op, twin.calib_y)
        if twin.calibration is not None:
            twin.calibration.detach()
    optimizer = BiasRecon(prior, op, sample.kspace[None], settings, sampler=TweedieSampler(),
                          calibration_bands=bands, reference=reference)
    if theta is not None:  # the oracle's loss on the self-supervised iterate: what the held-out split costs
        optimizer.calib_op, optimizer.calib_y = theta
    result = optimizer.run()
    scores = slice_scores(sample, result.image[0, 0])
    record = {"cell": cell_name, "row": row, "loss": loss, "slice": s, "fname": sample.fname,
              "slice_idx": sample.slice_idx, "psnr": scores["reference"][0], "ssim": scores["reference"][1],
              "seconds": time.perf_counter() - start, "num_adapted": result.num_adapted, "lam": result.lam,
              "misfit": result.misfit, "skipped": result.calibration_skipped,
              "val_loss_zero": result.val_loss_zero, "val_loss_best": result.val_loss_best,
              "gamma": None if result.gamma is None else result.gamma.flatten().tolist(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "host": socket.gethostname()}
    if pooled is not None:  # the calibration is the cell's: its γ, its guard, its seconds shared out over the slices
        record.update(seconds=record["seconds"] + pooled["seconds"] / cell.slices, num_adapted=pooled["gamma"].numel(),
                      skipped=pooled["skipped"], val_loss_zero=pooled["val_loss_zero"],
                      val_loss_best=pooled["val_loss_best"], gamma=pooled["gamma"].flatten().tolist())
    return record


def report(out: Path, cells: list[str], rows: list[str], losses: list[str]) -> str:
    def read(cell: str, row: str, loss: str) -> list[dict] | None:
        recs = [record_path(out, (cell, row, loss, s)) for s in range(CELLS[cell].slices)]
        return [json.loads(p.read_text()) for p in recs] if all(p.exists() for p in recs) else None

    lines = []
    for loss in losses:
        lines += [f"\n### {loss}: gain over the unadapted prior (dB, mean of the cell's slices; seconds per slice)\n",
                  "| family | variables | " + " | ".join(cells) + " | mean |", "|---|---:|" + "---:|" * (len(cells) + 1)]
        for row in rows:
            cols, gains, nvar = [], [], "—"
            for c in cells:
                base, recs = read(c, "unadapted", "none"), read(c, row, loss)
                if base is None or recs is None:
                    cols.append("…")
                    continue
                g = [r["psnr"] - b["psnr"] for r, b in zip(recs, base)]
                gains.append(np.mean(g))
                nvar = str(recs[0]["num_adapted"])
                kept = sum(r["val_loss_best"] is not None and r["val_loss_zero"] is not None
                           and r["val_loss_best"] < r["val_loss_zero"] for r in recs)
                cols.append(f"{np.mean(g):+.2f} ({', '.join(f'{v:+.2f}' for v in g)}; {kept}/{len(g)} kept; "
                            f"{np.mean([r['seconds'] for r in recs]):.0f} s)")
            mean = f"{np.mean(gains):+.2f}" if len(gains) == len(cells) else "…"
            lines.append(f"| {row} | {nvar} | " + " | ".join(cols) + f" | {mean} |")
    base_line = []
    for c in cells:
        base = read(c, "unadapted", "none")
        if base:
            base_line.append(f"{c}: unadapted {np.mean([b['psnr'] for b in base]):.2f} dB "
                             f"({np.mean([b['seconds'] for b in base]):.0f} s/slice)")
    return "; ".join(base_line) + "\n" + "\n".join(lines) + "\n"


def figure(out: Path, cells: list[str], rows: list[str], path: Path) -> None:
    """Bars of the gain over the unadapted prior per family: the oracle bound (light) and the self-supervised
    result (dark), one panel per cell (val slices)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def gain(cell: str, row: str, loss: str) -> float:
        paths = [record_path(out, (cell, row, loss, s)) for s in range(CELLS[cell].slices)]
        base = [record_path(out, (cell, "unadapted", "none", s)) for s in range(CELLS[cell].slices)]
        if not all(p.exists() for p in paths + base):
            return float("nan")
        return float(np.mean([json.loads(p.read_text())["psnr"] - json.loads(b.read_text())["psnr"]
                              for p, b in zip(paths, base)]))

    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], cells):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [gain(cell, r, "oracle") for r in rows], 0.4, color="#9ecae1", label="oracle bound")
        ax.bar(x + 0.2, [gain(cell, r, "heldout") for r in rows], 0.4, color="#08519c", label="self-supervised")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, rows, rotation=45, ha="right", fontsize=8)
        ax.set_title(cell, fontsize=9)
    axes[0][0].set_ylabel("gain over the unadapted prior (dB)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def row_problem(row: str) -> str | None:
    """Why ``row`` is not a row (None: it is one)."""
    try:
        name, change = row_settings(row)
        dataclasses.replace(SETTINGS, **change)
    except (ValueError, InputError) as error:
        return str(error).rstrip(".")
    if name not in FAMILY_ROWS:
        return f"{name!r} is not one of {', '.join(FAMILY_ROWS)} (optionally @lr, +kK and :key=value)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/calibration_screen"))
    parser.add_argument("--cells", default="brain_knee_4x,brain_knee_8x,knee_colin_4x",
                        help=f"comma list of {', '.join(CELLS)}")
    parser.add_argument("--rows", default=",".join(ORDER),
                        help="families (FAMILY_ROWS), each optionally with its own Adam step and guard folds: "
                             "sigma_in@0.3, norm_affine+k3, norm_affine:split_ratio=0.25:step_selection=last")
    parser.add_argument("--losses", default="oracle",
                        help="oracle, heldout, oracle_theta (the oracle's loss with the self-supervised run's "
                             "calibration iterate, built from y_Θc alone), pooled or oracle_pooled (one γ fitted on "
                             "all the cell's slices at once), comma list")
    parser.add_argument("--prepare", action="store_true", help="simulate the val slices and estimate their maps")
    parser.add_argument("--report", action="store_true", help="print the tables from the records")
    parser.add_argument("--figure", type=Path, help="with --report: draw the bars of bound and result to this PNG")
    args = parser.parse_args(argv)
    cells, rows, losses = args.cells.split(","), args.rows.split(","), args.losses.split(",")
    bad = ([f"key '--cells': {c!r} is not one of {', '.join(CELLS)}" for c in cells if c not in CELLS]
           + [f"key '--rows': {r!r}: {problem}" for r in rows if (problem := row_problem(r))]
           + [f"key '--losses': {v!r} is not one of {', '.join(LOSSES)}" for v in losses if v not in LOSSES]
           + [f"key '--rows': {problem}" for r in rows if not row_problem(r)
              for v in losses if v in POOLED and (problem := pooled_problem(r, v))])
    if bad:
        print(f"calibration_screen: {bad[0]}.", file=sys.stderr)
        return 2
    if args.report:
        print(report(args.out, cells, rows, losses))
        if args.figure is not None:
            figure(args.out, cells, rows, args.figure)
        return 0
    data = Data(args.out)
    if args.prepare:
        for c in cells:
            for s in range(CELLS[c].slices):
                data.maps(CELLS[c], s)
        return 0
    for unit in default_units(cells, rows, losses):
        path = record_path(args.out, unit)
        if path.exists() or not claim(path):
            continue
        try:
            record = run(data, unit)
            write_text(path, json.dumps(record, indent=1))
            print(f"{unit}: {record['psnr']:.2f} dB, {record['seconds']:.0f} s", flush=True)
        finally:
            release(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
