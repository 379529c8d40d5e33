"""Which ESPIRiT calibration explains the data: the SENSE fit's χ² and the maps' error, square vs rectangle.

    python studies/coil_maps.py --cells val4_knee_epi_4x,val4_knee_template_4x,val4_knee_colin_4x,brain_knee_4x
    python studies/coil_maps.py --cells ... --crops 0.02,0.1,0.3 --out docs/results/coil_maps.json

For each val slice of cells of ``studies/calibration_screen.py`` (their simulated data under ``--screen-out`` are
reused) and each ESPIRiT variant — the calibration block (``recon.coils.MAP_BLOCKS``: the centre's largest
square, as sigpy crops it, or every readout row × the centre columns) and the eigenvalue crop — it reports:

- ``chi2``: the misfit BiasRecon's gate reads, ``(σ_residual / σ_noise)²`` of the SENSE least-squares fit
  (``recon.sure.residual_sigma`` over ``estimate_sigma``): 1 when the maps explain the data, the gate opens at ≤ 2.5;
  none where the fit has too few residual degrees of freedom (8 coils at 8×: the gate does not act there either);
- ``map_error``: the part of the true maps (simulated sites store them) outside the estimated maps' span, inside the
  object, ``mean_r ‖S(r) − Ŝ(r) Ŝ(r)ᴴ S(r) / ‖Ŝ(r)‖²‖² / ‖S(r)‖²`` (a phase-free error; 1 where ``Ŝ = 0``);
- ``support``: the share of the object's pixels where the estimated maps are non-zero (the crop's support).

Seconds of ESPIRiT per slice are printed too. With ``--reconstruct``, also ``psnr``: the cell's prior as trained with
SURE's λ-step (the screen's ``unadapted`` row: the matrix's sampler) through each variant's maps, against the clean
reference — the support the crop leaves acts as a constraint, and χ² does not see it. BiasRecon with a variant's
maps is the screen's cells ``…_rect`` (``calibration_screen.py --cells val4_knee_epi_4x_rect``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_screen as screen  # noqa: E402  (the screen's cells and data)

from recon.atomic import write_text  # noqa: E402
from recon.biasrecon import BiasRecon  # noqa: E402
from recon.coils import MAP_BLOCKS, sensitivity_maps  # noqa: E402
from recon.errors import InputError  # noqa: E402
from recon.jobs import run_main  # noqa: E402
from recon.methods import slice_scores  # noqa: E402
from recon.operators import Sense  # noqa: E402
from recon.sure import estimate_sigma, residual_sigma  # noqa: E402
from scores.samplers import TweedieSampler  # noqa: E402


def map_error(estimate: torch.Tensor, truth: torch.Tensor, inside: torch.Tensor) -> float:
    """Mean over ``inside`` of the true maps' relative energy outside the estimate's span (phase-free).
    Shape: maps ``(C, H, W)`` complex, ``inside`` ``(H, W)`` bool."""
    energy = estimate.abs().pow(2).sum(0)
    coefficient = (estimate.conj() * truth).sum(0) / energy.clamp_min(1e-12)
    residual = (truth - estimate * coefficient).abs().pow(2).sum(0) / truth.abs().pow(2).sum(0).clamp_min(1e-12)
    residual = torch.where(energy > 0, residual, torch.ones_like(residual))
    return float(residual[inside].mean())


def measure(sample, block: str, crop: float, prior=None) -> dict:
    """One slice, one ESPIRiT variant: χ², map error, support, seconds (and the unadapted prior's PSNR with these
    maps, given its score network)."""
    start = time.perf_counter()
    maps = sensitivity_maps(sample, block=block, crop=crop)
    seconds = time.perf_counter() - start
    op = Sense(maps[None], sample.mask[None, None])
    kspace = sample.kspace[None]
    residual = residual_sigma(op, kspace)  # None: too few residual degrees of freedom (e.g. 8 coils at 8x)
    chi2 = None if residual is None else (residual / estimate_sigma(kspace, op.mask)) ** 2
    truth, reference = sample.sens_maps, sample.reference
    if reference is None or tuple(reference.shape) != tuple(truth.shape[-2:]):
        raise InputError(f"{sample.fname}: key 'reconstruction_clean' is missing or not {tuple(truth.shape[-2:])}, "
                         f"expected the clean image on the k-space grid (the object's support)")
    inside = reference > 0.1 * reference.max()
    record = {"chi2": chi2, "map_error": map_error(maps, truth, inside),
              "support": float((maps.abs().pow(2).sum(0) > 0)[inside].float().mean()),
              "fov_support": float((maps.abs().pow(2).sum(0) > 0).float().mean()), "seconds": seconds}
    if prior is not None:
        settings = dataclasses.replace(screen.SETTINGS, adapt="none")
        result = BiasRecon(prior, op, kspace, settings, sampler=TweedieSampler()).run()
        record["psnr"] = slice_scores(sample, result.image[0, 0])["reference"][0]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", required=True, help="comma list of the screen's cells (their maps key is ignored)")
    parser.add_argument("--crops", default="0.02,0.1,0.3", help="ESPIRiT eigenvalue crops, comma list")
    parser.add_argument("--screen-out", type=Path, default=Path("out/calibration_screen"))
    parser.add_argument("--out", type=Path, default=None, help="also write the records as JSON here")
    parser.add_argument("--blocks", default=",".join(MAP_BLOCKS), help="ESPIRiT calibration blocks, comma list")
    parser.add_argument("--reconstruct", action="store_true",
                        help="also reconstruct each slice with the cell's prior (unadapted, SURE) through each variant")
    args = parser.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in screen.CELLS]
    if unknown:
        raise InputError(f"--cells: unknown cell(s) {', '.join(unknown)}; expected some of {', '.join(screen.CELLS)}")
    crops = [float(c) for c in args.crops.split(",") if c]
    blocks = [b for b in args.blocks.split(",") if b]
    if not blocks or any(b not in MAP_BLOCKS for b in blocks):
        raise InputError(f"--blocks {args.blocks!r}: expected some of {', '.join(MAP_BLOCKS)}, comma-separated")
    if not crops or not all(0 < c < 1 for c in crops):
        raise InputError(f"--crops {args.crops!r}: expected ESPIRiT crops between 0 and 1, comma-separated")
    if args.out is not None and args.out.exists():
        raise InputError(f"--out {args.out} exists; it is not overwritten")
    data = screen.Data(args.screen_out)
    records = []
    print("| cell | block | crop | χ² (per slice) | map error | support (object / FOV) | s/slice | PSNR (per slice) |\n"
          "|---|---|---:|---|---:|---:|---:|---|")
    for name in cells:
        cell = screen.CELLS[name]
        samples = [data.sample(cell, s) for s in range(cell.slices)]
        for sample in samples:
            if sample.sens_maps is None:
                raise InputError(f"{sample.fname}: key 'sens_maps' is missing, expected the simulation's true maps")
        prior = data.prior(cell.prior) if args.reconstruct else None
        for block in blocks:
            for crop in crops:
                rows = [measure(s, block, crop, prior) | {"cell": name, "slice": i, "block": block,
                                                        "crop": crop} for i, s in enumerate(samples)]
                records += rows
                chi2 = [r["chi2"] for r in rows if r["chi2"] is not None]
                psnr = [r["psnr"] for r in rows if "psnr" in r]
                chi2_text = f"{np.mean(chi2):.2f} ({', '.join(f'{c:.1f}' for c in chi2)})" if chi2 else "— (too few dof)"
                print(f"| {name} | {block} | {crop:g} | {chi2_text}"
                      f" | {np.mean([r['map_error'] for r in rows]):.4f} | {np.mean([r['support'] for r in rows]):.3f}"
                      f" / {np.mean([r['fov_support'] for r in rows]):.2f} | {np.mean([r['seconds'] for r in rows]):.1f} | "
                      + (f"{np.mean(psnr):.2f} ({', '.join(f'{p:.2f}' for p in psnr)})" if psnr else "—") + " |",
                      flush=True)
    if args.out is not None:
        write_text(args.out, json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
