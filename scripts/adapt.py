"""Adapt a score-based prior to a site's scans at test time (BiasRecon) and reconstruct them.

Usage::

    python scripts/adapt.py --site unseen_center
        [--data PATH] [--prior NAME|PATH] [--profile PATH] [--max-slices N] [--out DIR]
        [--config YAML] [key=value ...]

Data: ``--data PATH`` (a fastMRI-format h5 file or folder: multi- or single-coil, fully or
prospectively undersampled, any matrix size and raw scale) if given — the site then supplies
only the method settings, and its mask (``acquisition``) is applied to fully sampled files only.
Otherwise the site's own data: a fastMRI site reads ``data.root``; a simulated site is simulated
(once, cached) into ``DIR/data/<site>-seed<S>`` (``S = simulation_seed``). ``--max-slices N``
keeps the first N slices in dataset order (files sorted by name, slices in order).

Prior: ``--prior NAME`` a bundled prior (``scores/weights/NAME.safetensors``; ``--help`` lists
them) or ``--prior PATH`` a checkpoint file; default: the prior the site names (its key ``prior``:
brain sites ``colin27_t1``, knee sites ``stanford_knee``, the template sites ``source_brain``), else
``source_brain``. The run summary says which prior ran and why.

Configuration: ``configs/biasrecon/default.yaml`` (or ``--config``) on the adapt config schema
(:class:`recon.config.AdaptConfig`; its ``biasrecon`` section is
:class:`recon.biasrecon.BiasReconSettings`), then ``key=value`` overrides: keys starting with
``site.`` go, without the prefix, to the site (``site.acquisition.acceleration=8``); every other
key to the adapt config (``biasrecon.num_steps=20``, ``biasrecon.calibration_family=bands calibration.bands=4``,
``mode=site``).
Unknown keys are errors. The defaults are chosen for quality (60 noise levels, 2 posterior samples:
``docs/results/speed_quality.md``); ``preset=fast`` (8 levels, 1 sample; ``make demo``) is the cheap end, and keys
on the command line override the preset's. The summary names the preset, its levels and samples.

Methods (``methods``, the method table of :mod:`recon.methods`): ``biasrecon`` (the ``biasrecon``
section as configured: γ calibration, λ by SURE), ``biasrecon_nosure`` (the same with the fixed
λ), ``unadapted`` (the prior as trained, fixed λ), ``unadapted_sure`` (the prior as trained, λ by
SURE), ``finetune`` (every weight of the prior fitted per scan, the full test-time-adaptation
baseline), ``prior_dc`` (near-hard data consistency), and the classical ``zero_filled``, ``sense``,
``l1wavelet``, ``tv``.

Modes: ``scan`` calibrates γ on each batch of slices (slices of one file, up to ``batch_size``);
``site`` calibrates γ once on the first ``calib_slices`` slices (those of the first slice's
matrix size) and then reconstructs every slice with that γ fixed. ``--profile PATH``: when the
file exists, its γ is reused for every slice (no calibration, in either mode; it must belong to
the prior); otherwise the calibration is saved there (mode site: the site calibration; mode scan:
the first batch's γ). ``DIR/profile.json`` holds the same γ (the reused one, the site calibration,
or the first batch's); it is not written when no method calibrates γ.

Volumes are the unit of work. Under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA)
rank ``r`` takes the volumes ``v`` with ``v % N == r`` (dataset order; mode site: rank 0 calibrates
and broadcasts γ), and the union of the outputs equals a single-process run. Each volume's
reconstructions are written (atomically) as soon as its slices are done, then its record
``DIR/records/<file>.json`` (config hash and facts); a rerun skips volumes whose record carries the
same config hash (settings, site, prior, the shared γ, the input file's size and mtime, its
slices) and redoes the others. SIGTERM / SIGINT stop the run with exit code 128 + signal, leaving
no partial file; the same command then completes the set. Rank 0 writes the summary outputs from
every volume's record:

Outputs (each file atomically; never into the input folder):

* ``DIR/reconstructions/METHOD/<input file name>.h5``: dataset ``reconstruction``
  ``(slices, h, w)`` float32 magnitude on the file's raw scale, centre-cropped to fastMRI's
  ``recon_size`` (the header's ``reconSpace``) when the file has one, else to the target's size,
  else at the k-space matrix (fastMRI's submission format; ``reconstruct.py`` writes the same).
* ``DIR/metrics.json``: ``{method: {"psnr", "ssim", "nmse", "seconds_per_slice", "lam", ...}}`` —
  fastMRI's volume-wise metrics averaged over volumes (only when the files have targets; simulated
  files also give ``psnr_clean``, ``ssim_clean``, ``nmse_clean`` against their clean reference), the
  mean wall time per slice (sensitivity maps excluded; in mode site the calibration time is
  shared over the slices), the mean λ used, and for calibrating methods the validation held-out
  loss at γ = 0 and at the kept γ (``val_loss_zero``, ``val_loss_best``).
* ``DIR/figures/comparison.png`` (first slice: the clean reference of simulated files, else the
  target; unadapted, BiasRecon and |error| maps),
  ``DIR/figures/trajectories.png`` (held-out loss per calibration step; SURE curve λ vs SURE),
  ``DIR/figures/gamma.png`` (the kept γ, layers × bands).
* ``DIR/profile.json`` (see above), ``DIR/profiles/<file>.json`` (mode scan: each volume's first
  batch's γ) and ``DIR/config.yaml`` (the resolved adapt and site config).

Bad input: ``error: <message>`` on stderr, exit code 2 (arguments, configs, the site, the data
files' structure and the prior are checked before the output folder is created; a bad value found
while reading a slice, such as NaN k-space, stops the run before that volume is written).

The work is done by :func:`recon.runner.run`; this script reads the command line and hands over
the prior and the sampler (``scores``), which recon never imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from recon.config import DEFAULT_CONFIG, load_config, split_overrides
from recon.data.sites import site_prior
from recon.jobs import OneLineParser, run_main
from recon.runner import RunSpec, run
from scores.checkpoints import CheckpointError
from scores.config import ConfigError
from scores.priors import PRIOR_HELP, bundled_priors, choose_prior, load_prior
from scores.samplers import TweedieSampler

__all__ = ["parse_args", "spec_from_args", "main"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (usage errors are one ``error:`` line, exit code 2)."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, help="site name in configs/sites or a .yaml path")
    parser.add_argument("--data", type=Path, help="fastMRI-format h5 file or folder (default: the site's data)")
    parser.add_argument("--prior", default=None, help=PRIOR_HELP.format(names=", ".join(bundled_priors())))
    parser.add_argument("--profile", type=Path, help="site profile to reuse (if it exists) or to save")
    parser.add_argument("--max-slices", type=int, help="reconstruct only the first N slices")
    parser.add_argument("--out", type=Path, help="output folder (default: out/adapt/<site>)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="adapt config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides; site.KEY=VALUE goes to the site")
    return parser.parse_intermixed_args(argv)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run the command line asks for: the adapt config with its overrides, the site's overrides,
    and the prior (loaded by the runner on its device) with the sampler."""
    adapt_items, site_items = split_overrides(args.overrides)
    config = load_config(args.config, adapt_items)
    named, file = site_prior(args.site, site_items)
    prior, why = choose_prior(args.prior, file.stem, named, str(file))  # a bad one fails now
    return RunSpec(site=args.site, config=config, site_items=site_items, out=args.out, data=args.data,
                   max_slices=args.max_slices, profile=args.profile, prior=partial(load_prior, prior),
                   sampler=TweedieSampler(), prior_reason=why)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one ``error:`` line on bad input; ``128 + signal``
    after SIGTERM / SIGINT, with the finished volumes kept for a rerun to skip)."""
    return run_main(lambda items: run(spec_from_args(parse_args(items))), argv, (CheckpointError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
