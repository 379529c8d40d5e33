"""Simulate a site's fastMRI-format multi-coil volumes.

Usage::

    python scripts/simulate_site.py --site unseen_center --out DIR --seed 3 [--prospective]
        [--overwrite] [key=value ...]

``key=value`` items override the site's YAML (e.g. ``noise.sigma=0.02 data.num_subjects=4``).
Prints the output folder and the files written. Bad input: ``error: <message>`` on stderr,
exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recon.data.sites import load_site, simulate_site
from recon.errors import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", required=True, help="site name in configs/sites or a .yaml path")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (same seed, same bytes)")
    parser.add_argument("--prospective", action="store_true", help="store undersampled k-space (zeros where not sampled)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    parser.add_argument("overrides", nargs="*", help="site overrides, e.g. acquisition.acceleration=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        site = load_site(args.site, args.overrides)
        paths = simulate_site(site, args.out, args.seed, prospective=args.prospective, overwrite=args.overwrite)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files for site {site.name} (seed {args.seed}) to {args.out.resolve()}")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
