"""The speed–quality curve: seconds per slice against PSNR / SSIM over noise levels × posterior samples.

A **point** is one method at one setting on one slice (a *case*) and one device: seconds per slice and
PSNR / SSIM against the clean reference. The prior methods sweep ``num_steps`` (noise levels) ×
``num_samples`` (posterior samples averaged); the classical methods are one point each (their λ the
oracle one), drawn as horizontal lines. Points are kept one per file (:class:`PointStore`), so an
interrupted sweep continues where it stopped.

The **knee** of a method's curve (:func:`knee_point`) is its cheapest setting whose PSNR is within
``tolerance`` dB of the method's best PSNR on every case: the rule the shipped defaults follow. Cheapest by
``levels × samples``, the sampler chains' network evaluations, which the seconds of every prior method grow
with: seconds measured on a machine shared with other jobs are not comparable from one point to the next.

The unadapted prior's K-sample estimate is the mean of K chains with seeds ``seed, …, seed + K − 1``
(:meth:`recon.biasrecon.BiasRecon.x_step_chain`), so a sweep runs each chain once and averages prefixes
(:func:`mean_of_chains`); its seconds are the sum of the chains'.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from recon.atomic import write_bytes, write_text
from recon.errors import InputError

__all__ = ["CurvePoint", "PointStore", "mean_of_chains", "knee_point", "pareto_front", "curve_table",
           "curve_figure"]


@dataclass(frozen=True)
class CurvePoint:
    """One method at one setting on one case and device.

    Attributes:
        device: ``cpu`` or ``cuda`` (the table says which card); case: the slice's name (e.g. ``knee``).
        method: ``unadapted``, ``biasrecon``, or a classical method (``sense``, ``tv``, ``l1wavelet``).
        levels: noise levels (``num_steps``), 0 for a classical method; samples: posterior samples
            averaged (``num_samples``), 0 for a classical method.
        seconds: wall time per slice; psnr / ssim: against the clean reference (fastMRI's definitions);
        params: what else was chosen (the oracle λ, SURE's λ).
    """

    device: str
    case: str
    method: str
    levels: int
    samples: int
    seconds: float
    psnr: float
    ssim: float
    params: str = ""

    @property
    def key(self) -> str:
        """The file name of the point: ``device_case_method_L<levels>_K<samples>``."""
        return f"{self.device}_{self.case}_{self.method}_L{self.levels}_K{self.samples}"

    @property
    def classical(self) -> bool:
        """A classical method (no noise levels)."""
        return self.levels == 0


class PointStore:
    """Points (and chain images) kept one per file under a folder, written atomically.

    ``folder/points/<key>.json`` per point; ``folder/chains/<name>.pt`` per sampler chain image.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _point_path(self, key: str) -> Path:
        return self.folder / "points" / f"{key}.json"

    def get(self, key: str) -> CurvePoint | None:
        """The stored point of ``key``, or None."""
        path = self._point_path(key)
        return CurvePoint(**json.loads(path.read_text())) if path.is_file() else None

    def put(self, point: CurvePoint) -> CurvePoint:
        """Store ``point`` (atomically); returns it."""
        write_text(self._point_path(point.key), json.dumps(asdict(point), indent=1) + "\n")
        return point

    def points(self) -> list[CurvePoint]:
        """Every stored point, sorted by device, case, method, levels, samples."""
        folder = self.folder / "points"
        found = [CurvePoint(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return sorted(found, key=lambda p: (p.device, p.case, p.method, p.levels, p.samples))

    def chain(self, name: str) -> tuple[torch.Tensor, float] | None:
        """A stored chain ``(image, seconds)``, or None."""
        path = self.folder / "chains" / f"{name}.pt"
        if not path.is_file():
            return None
        payload = torch.load(path, weights_only=True)
        return payload["image"], float(payload["seconds"])

    def put_chain(self, name: str, image: torch.Tensor, seconds: float) -> None:
        """Store a chain's complex image ``(H, W)`` and its seconds (atomically)."""
        buffer = io.BytesIO()
        torch.save({"image": image.detach().cpu(), "seconds": torch.tensor(seconds)}, buffer)
        write_bytes(self.folder / "chains" / f"{name}.pt", buffer.getvalue())


def mean_of_chains(chains: Sequence[torch.Tensor], samples: int) -> torch.Tensor:
    """The ``samples``-sample estimate from single chains run with seeds ``seed, seed + 1, …``.

    Maths: ``x̄_K = (1/K) Σ_{k<K} x₀^(k)``, what ``BiasRecon`` with ``num_samples=K`` (no calibration, fixed λ)
    returns. Shape: each chain complex ``(H, W)`` (or any common shape); returns the same shape.

    Raises:
        InputError: fewer chains than ``samples``, or ``samples < 1``.
    """
    if samples < 1 or len(chains) < samples:
        raise InputError(f"speed_quality: key 'samples' is {samples} with {len(chains)} chains, expected 1 ≤ samples ≤ chains.")
    total = chains[0]
    for c in chains[1:samples]:
        total = total + c
    return total / samples


def _settings(points: Iterable[CurvePoint]) -> dict[tuple[str, str, int, int], CurvePoint]:
    return {(p.device, p.case, p.levels, p.samples): p for p in points}


def knee_point(points: Sequence[CurvePoint], method: str, tolerance: float = 0.2,
               device: str | None = None) -> tuple[int, int] | None:
    """The knee of a method's curve: its cheapest ``(levels, samples)`` within ``tolerance`` dB of its best.

    Maths: over the settings ``s = (levels, samples)`` measured on every case, ``argmin_s levels·samples``
    (ties: fewer levels) subject to ``PSNR(s, c) ≥ max_s' PSNR(s', c) − tolerance`` for every case ``c``.

    Args:
        points: The curve's points (any methods, cases and devices).
        method: The method whose knee to find.
        tolerance: dB below the best PSNR a setting may stay.
        device: Only this device's points (default: the first device, sorted).

    Returns:
        ``(levels, samples)``, or None when the method has no point measured on every case.
    """
    mine = [p for p in points if p.method == method and not p.classical]
    if not mine:
        return None
    device = device or sorted({p.device for p in mine})[0]
    cases = sorted({p.case for p in points if p.device == device})  # every case of the device, any method
    mine = [p for p in mine if p.device == device]
    table = _settings(mine)
    settings = sorted({(p.levels, p.samples) for p in mine if all((device, c, p.levels, p.samples) in table for c in cases)})
    if not settings:
        return None
    best = {c: max(table[(device, c, *s)].psnr for s in settings) for c in cases}
    good = [s for s in settings if all(table[(device, c, *s)].psnr >= best[c] - tolerance for c in cases)]
    return min(good, key=lambda s: (s[0] * s[1], s))


def pareto_front(points: Sequence[CurvePoint]) -> list[CurvePoint]:
    """The points no other point beats in both seconds and PSNR, by increasing seconds."""
    ordered = sorted(points, key=lambda p: (p.seconds, -p.psnr))
    front, best = [], -math.inf
    for p in ordered:
        if p.psnr > best:
            front.append(p)
            best = p.psnr
    return front


def curve_table(points: Sequence[CurvePoint], tolerance: float = 0.2) -> str:
    """The points as markdown tables, one per device and case: method, levels, samples, s/slice, PSNR, SSIM,
    and the distance to the method's best PSNR on that case (the knee marked ✓ where within ``tolerance``)."""
    out = []
    for device in sorted({p.device for p in points}):
        for case in sorted({p.case for p in points if p.device == device}):
            rows = [p for p in points if p.device == device and p.case == case]
            best = {m: max(p.psnr for p in rows if p.method == m) for m in {p.method for p in rows}}
            out.append(f"**{case}, {device}**\n\n| method | levels | samples | levels × samples | s/slice | PSNR (dB) | SSIM "
                       "| − best of method |\n|---|---:|---:|---:|---:|---:|---:|---:|")
            for p in sorted(rows, key=lambda p: (not p.classical, p.method, p.levels, p.samples)):
                gap = p.psnr - best[p.method]
                levels = f"{p.levels}" if not p.classical else "—"
                samples = f"{p.samples}" if not p.classical else "—"
                mark = " ✓" if not p.classical and gap >= -tolerance else ""
                name = p.method + (f" ({p.params})" if p.params else "")
                gap_cell = "—" if p.classical else f"{gap:+.2f}{mark}"
                evals = "—" if p.classical else f"{p.levels * p.samples}"
                out.append(f"| {name} | {levels} | {samples} | {evals} | {p.seconds:.1f} | {p.psnr:.2f} | {p.ssim:.3f} | "
                           f"{gap_cell} |")
            out.append("")
    return "\n".join(out)


def curve_figure(points: Sequence[CurvePoint], path: str | Path) -> Path:
    """The curve as a PNG: one panel per case and device, seconds per slice (log) on x, PSNR on y, one line per
    prior method through its Pareto front (every point marked ``levels/samples``), classical methods as
    horizontal lines. Written atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(p.device, p.case) for p in points})
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    colours = {"unadapted": "tab:blue", "biasrecon": "tab:red"}
    styles = {"sense": ":", "tv": "--", "l1wavelet": "-."}
    for ax, (device, case) in zip(axes[0], panels):
        rows = [p for p in points if p.device == device and p.case == case]
        for method in sorted({p.method for p in rows if not p.classical}):
            mine = [p for p in rows if p.method == method]
            colour = colours.get(method, None)
            ax.scatter([p.seconds for p in mine], [p.psnr for p in mine], s=14, color=colour, alpha=0.6)
            for p in mine:
                ax.annotate(f"{p.levels}/{p.samples}", (p.seconds, p.psnr), fontsize=6, xytext=(2, 2),
                            textcoords="offset points", color=colour)
            front = pareto_front(mine)
            ax.plot([p.seconds for p in front], [p.psnr for p in front], "-o", ms=3, color=colour, label=method)
        for p in sorted((p for p in rows if p.classical), key=lambda p: p.method):
            label = f"{p.method} ({p.params}, {p.seconds:.1f} s)" if p.params else f"{p.method} ({p.seconds:.1f} s)"
            ax.axhline(p.psnr, color="0.35", linestyle=styles.get(p.method, "-"), linewidth=1,
                       label=f"{label}, {p.psnr:.2f} dB")
        shown = [p.psnr for p in rows if p.method != "sense"]
        if shown:  # SENSE lies far below: keep the axis on the others and name it
            low = min(shown) - 0.8
            ax.set_ylim(bottom=low, top=max(shown) + 0.3)
            for p in rows:
                if p.classical and p.psnr < low:
                    ax.text(0.02, 0.02, f"{p.method}: {p.psnr:.2f} dB (below the axis)", transform=ax.transAxes,
                            fontsize=7, color="0.35")
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds per slice ({device})")
        ax.set_ylabel("PSNR vs clean reference (dB)")
        ax.set_title(f"{case} ({device}); points: levels/samples", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())
