"""Figure of every simulated site: one slice (fully sampled RSS target) and its sampling mask.

Usage::

    python studies/plot_sites.py [--out docs/figures/sites.png] [--seed 0]

Simulates one subject per site in a temporary folder, reads it back through
``FastMRISliceDataset`` with the site's mask, and writes the PNG atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from recon.data.sites import available_sites, load_site, site_dataset
from recon.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "sites.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sites = []
        for name in available_sites():
            if name.startswith("fastmri_"):
                continue  # user data, not simulated
            sites.append(load_site(name, ["data.num_subjects=1"]))
        fig, axes = plt.subplots(2, len(sites), figsize=(2.6 * len(sites), 5.6), squeeze=False)
        with tempfile.TemporaryDirectory() as workdir:
            for col, site in enumerate(sites):
                dataset = site_dataset(site, workdir, seed=args.seed)
                sample = dataset[len(dataset) // 2]
                acq = site.acquisition
                axes[0, col].imshow(sample.target.numpy(), cmap="gray")
                axes[0, col].set_title(f"{site.name}\n{sample.acquisition}, {site.coils.count} coils", fontsize=8)
                axes[1, col].imshow(sample.mask.numpy(), cmap="gray", vmin=0, vmax=1)
                axes[1, col].set_title(f"{acq.mask_type} R={sample.acceleration:.1f}\n{acq.matrix[0]}x{acq.matrix[1]}", fontsize=8)
                for ax in axes[:, col]:
                    ax.set_xticks([])
                    ax.set_yticks([])
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}.png")
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, args.out)
        finally:
            if tmp.exists():
                tmp.unlink()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
