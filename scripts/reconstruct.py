"""Reconstruct a site's slices with one or more methods; write fastMRI-format results and metrics.

Usage::

    python scripts/reconstruct.py --site unseen_center --method all --out DIR
        [--data PATH] [--max-slices N] [--tune] [--grid 1e-3,3e-3,1e-2] [--oracle-maps]
        [--param tv.max_iter=100 ...] [--seed S] [--prior NAME|PATH] [key=value ...]

Data: ``--data PATH`` (a fastMRI-format h5 file or folder) if given; otherwise the site's own
data: a fastMRI site reads ``data.root``, a simulated site is simulated (once, cached) into
``DIR/data/<site>-seed<S>``. Fully sampled files are undersampled with the site's acquisition
(mask type, acceleration, centre fraction, mask seed); ``key=value`` items override the site.

Methods (the method table of :mod:`recon.methods`, the same names as ``adapt.py``): ``--method``
is a name, a comma list, ``all`` (the classical methods zero_filled, sense, l1wavelet, tv) or
``all+prior`` (every method). The prior-based ones (``unadapted``, ``unadapted_sure``,
``biasrecon``, ...) run BiasRecon with the library's settings
(:class:`recon.biasrecon.BiasReconSettings`) on one slice at a time, with the prior of
``--prior NAME|PATH`` (a bundled name — ``--help`` lists them — or a checkpoint file; default:
the prior the site names, its key ``prior``, else ``source_brain``). Sensitivity maps are ESPIRiT from each slice's auto-calibration centre,
computed once per slice and shared by every method, or the file's true maps with
``--oracle-maps`` (simulated sites; an upper bound). ``--param METHOD.KEY=VALUE`` sets a method's
parameter (a classical method's keyword, a prior method's settings field); ``--tune`` picks λ of
l1wavelet / tv on a grid by the best mean PSNR on the very slices being reconstructed (the
"best-tuned" baseline; needs targets, keeps the slices in memory) and records the table in
``DIR/tuning.json``.

``--max-slices N`` reconstructs the first N slices in dataset order (files sorted by name, slices
in order); a file cut short gets a volume of its first slices only.

Volumes are the unit of work: under ``torchrun --nproc_per_node=N`` rank ``r`` takes the volumes
``v`` with ``v % N == r`` (dataset order; the union equals a single-process run; ``--tune`` needs
one process). Each volume's reconstructions are written (atomically) when its slices are done,
then its record ``DIR/records/<file>.json``; a rerun skips volumes whose record carries the same
config hash (methods, parameters incl. the tuned λ and the prior's sha256, site, maps, the input
file's size, mtime and slices) and redoes the others. SIGTERM / SIGINT stop the run with exit
code 128 + signal and no partial file; the same command completes the set.

Outputs (each file atomically):

* ``DIR/reconstructions/METHOD/<input file name>.h5``: dataset ``reconstruction``
  ``(slices, h, w)`` float32 magnitude on the file's raw scale, centre-cropped to fastMRI's
  ``recon_size`` (the header's ``reconSpace``) when the file has one, else to the target's size
  (fastMRI's submission format, scored by ``fastmri.evaluate``; ``adapt.py`` writes the same).
* ``DIR/metrics.json``: ``{method: {"psnr", "ssim", "nmse", "seconds_per_slice", ...}}``,
  fastMRI's volume-wise metrics averaged over volumes (when the files have targets);
  ``seconds_per_slice`` is the mean wall time of the method (sensitivity maps excluded, reported
  on stdout); prior methods add the mean ``lam`` (and SURE's ``noise_sigma`` and the model ``misfit`` χ²).

Bad input: ``error: <message>`` on stderr, exit code 2; arguments, site and the files' structure
are checked before anything is written, and a bad value found while reading a slice stops the run
before that volume is written.

The work is done by :func:`recon.runner.run` (with one slice per batch and the CPU); this script
reads the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from recon.config import AdaptConfig
from recon.errors import InputError
from recon.jobs import OneLineParser, run_main
from recon.methods import DEFAULT_LAMBDA_GRID, PRIOR_METHODS, TUNABLE_METHODS, check_params, method_parameters
from recon.methods import parse_lambdas, parse_methods
from recon.runner import RunSpec, run
from scores.checkpoints import CheckpointError
from recon.data.sites import site_prior
from scores.priors import PRIOR_HELP, bundled_priors, choose_prior, load_prior
from scores.samplers import TweedieSampler

__all__ = ["parse_args", "parse_params", "parse_grid", "spec_from_args", "main"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (usage errors are one ``error:`` line, exit code 2)."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, help="site name in configs/sites or a .yaml path")
    parser.add_argument("--method", default="all",
                        help="a method, a comma list, 'all' (classical methods) or 'all+prior' (every method)")
    parser.add_argument("--data", type=Path, help="fastMRI-format h5 file or folder (default: the site's data)")
    parser.add_argument("--max-slices", type=int, help="reconstruct only the first N slices")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--tune", action="store_true", help="grid-search λ of l1wavelet/tv on the same slices")
    parser.add_argument("--grid", help=f"comma list of λ for --tune (default {','.join(map(str, DEFAULT_LAMBDA_GRID))})")
    parser.add_argument("--oracle-maps", action="store_true", help="use the file's true sensitivity maps")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method parameter, e.g. tv.max_iter=100 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed of a simulated site")
    parser.add_argument("--prior", default=None, help="prior of the prior-based methods: "
                        + PRIOR_HELP.format(names=", ".join(bundled_priors())))
    parser.add_argument("overrides", nargs="*", help="site overrides, e.g. acquisition.acceleration=8")
    return parser.parse_args(argv)


def parse_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` items → ``{method: {key: value}}`` (values read as YAML scalars), checked.

    Raises:
        InputError: a malformed item, a method not run, an unknown parameter or an invalid value.
    """
    params: dict[str, dict] = {m: {} for m in methods}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise InputError(
                f"command line: key '--param {item}' is malformed, expected METHOD.KEY=VALUE like tv.lam=0.01."
            )
        if method not in params:
            raise InputError(
                f"command line: key '--param {item}' names method {method!r}, expected one of the methods run "
                f"({', '.join(methods)})."
            )
        if name not in method_parameters(method):
            raise InputError(f"command line: key '--param {item}' is not a parameter of {method}, expected one of "
                             f"{', '.join(method_parameters(method)) or '(none)'}.")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
        except Exception:  # omegaconf/yaml errors come in many types
            raise InputError(
                f"command line: key '--param {item}' has an unreadable value, expected a number or word."
            ) from None
        params[method][name] = value
    for method, values in params.items():
        try:
            check_params(method, values)
        except InputError as exc:
            raise InputError(f"command line: key '--param' is invalid ({str(exc).rstrip('.')}).") from None
    return params


def parse_grid(text: str | None) -> list[float]:
    """``--grid`` as a list of non-negative λ (the default grid when not given)."""
    if text is None:
        return list(DEFAULT_LAMBDA_GRID)
    return parse_lambdas(text, "command line: key '--grid'")


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run the command line asks for: one slice per batch on the CPU, the library's settings for
    the prior methods, the tuned methods and their grid.

    Raises:
        InputError: bad methods, parameters, grid or ``--tune``; CheckpointError: a bad ``--prior``.
    """
    methods = parse_methods(args.method)
    params = parse_params(args.param, methods)
    grid = parse_grid(args.grid)
    tuned = [m for m in methods if m in TUNABLE_METHODS] if args.tune else []
    if args.tune and not tuned:
        raise InputError(
            f"command line: key '--tune' needs {' or '.join(TUNABLE_METHODS)} among --method, got {', '.join(methods)}."
        )
    for m in tuned:
        if "lam" in params[m]:
            raise InputError(f"command line: key '--param {m}.lam' conflicts with --tune, expected one of the two.")
    config = AdaptConfig(methods=methods, maps="true" if args.oracle_maps else "espirit", batch_size=1,
                         device="cpu", simulation_seed=args.seed)
    uses_prior = any(m in PRIOR_METHODS for m in methods)
    prior, why = None, ""
    if uses_prior or args.prior is not None:  # a bad --prior or site prior fails now
        named, file = site_prior(args.site, list(args.overrides))
        prior, why = choose_prior(args.prior, file.stem, named, str(file))
    return RunSpec(site=args.site, config=config, site_items=list(args.overrides), out=args.out,
                   default_out="reconstruct", data=args.data, max_slices=args.max_slices, params=params,
                   tune=tuned, grid=grid, summary=False,
                   prior=partial(load_prior, prior) if uses_prior else None,
                   sampler=TweedieSampler() if uses_prior else None, prior_reason=why)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one ``error:`` line on bad input; ``128 + signal``
    after SIGTERM / SIGINT, with the finished volumes kept for a rerun to skip)."""
    return run_main(lambda items: run(spec_from_args(parse_args(items))), argv, (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
