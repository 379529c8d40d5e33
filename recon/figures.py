"""Figures of a run, rendered to PNG bytes (written with the other summary outputs at the end).

* :func:`comparison_figure`: the first slice — target, each method, and ``|error|`` maps under them.
* :func:`trajectories_figure`: the held-out k-space loss per calibration step, and SURE's λ curve.
* :func:`gamma_figure`: the kept γ, layers × bands.
* :func:`panel_figure`: a reference, images and their error maps; :func:`matrix_heatmap`: priors × domains.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from torch import nn
from recon.data.sample import Sample
from recon.metrics import psnr

__all__ = ["comparison_figure", "trajectories_figure", "gamma_figure", "panel_figure", "matrix_heatmap"]


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (and closed)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_figure(sample: Sample, images: dict[str, np.ndarray]) -> bytes:
    """First slice: the clean reference (simulated files) or else the target, each method, and |error|
    maps under them (PSNR against it in the titles).

    Shape: ``images`` ``{method: (h, w)}`` raw scale; the reference is the Sample's, back on the raw scale.
    """
    title = f"{sample.fname} slice {sample.slice_idx}"
    if sample.reference is not None:
        return panel_figure(sample.denormalize(sample.reference).numpy(), images, title, "clean reference")
    target = None if sample.target is None else sample.denormalize(sample.target).numpy()
    return panel_figure(target, images, title, "target")


def trajectories_figure(history: list[dict], history_label: str, sure_curves: dict[str, dict]) -> bytes:
    """Held-out k-space loss per calibration step, and the SURE curve λ vs SURE(λ) with the chosen λ.

    ``sure_curves``: ``{method: {"lam": λ, "sure_curve": [(λ, SURE(λ))]}}`` of the first batch.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if history:
        steps = [r["step"] for r in history]
        left.plot(steps, [r["loss"] for r in history], "o-", label="held-out loss (random split)")
        left.plot(steps, [r["val_loss"] for r in history], "s-", label="validation loss of the kept γ")
        left.set_xlabel("calibration step")
        left.xaxis.get_major_locator().set_params(integer=True)
        left.set_ylabel(r"$\|M_\Lambda(FSx) - y_\Lambda\|^2 / \|y_\Lambda\|^2$")
        left.legend(fontsize=8)
        left.set_title(f"calibration ({history_label})", fontsize=10)
    else:
        left.text(0.5, 0.5, "no calibration in this run", ha="center", va="center")
        left.set_axis_off()
    drawn = False
    for name, first in sure_curves.items():
        if first["sure_curve"]:
            lams, values = zip(*first["sure_curve"])
            right.plot(lams, values, "o-", label=f"{name} (λ = {first['lam']:g})")
            right.axvline(first["lam"], color=right.lines[-1].get_color(), ls=":")
            drawn = True
    if drawn:
        right.set_xscale("log")
        right.set_xlabel("λ")
        right.set_ylabel("SURE(λ)")
        right.legend(fontsize=8)
        right.set_title("λ-step (first batch)", fontsize=10)
    else:
        right.text(0.5, 0.5, "no SURE in this run", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    return _png(fig)


_GAMMA_COLUMNS = {"norm_affine": ["scale a", "shift b"], "freeu": ["backbone b", "skip low c"],
                  "conv_gain": ["gain"], "sigma_in": ["log σ factor"], "sigma_residual": ["γ"]}


def gamma_figure(calibration: nn.Module, label: str) -> bytes:
    """Heatmap of γ with its rows named: layers × bands for the ``bands`` family, the hooked layers (or the
    noise-level blocks) × the family's variables for the others (:mod:`recon.adapt.families`)."""
    plt = _pyplot()
    gamma = calibration.gamma.detach().cpu().numpy()
    gamma = gamma[:, None] if gamma.ndim == 1 else gamma
    rows, columns = gamma.shape
    family = getattr(calibration, "family", "bands")
    if family == "bands":
        edges = (0.0, *calibration.band_edges, 2**0.5)
        xlabels = [f"band {b}\n{edges[b]:.2f}-{edges[b + 1]:.2f}" for b in range(columns)]
    else:
        xlabels = _GAMMA_COLUMNS.get(family, [f"band {b}" for b in range(columns)])
    names = list(calibration.layer_names) if len(calibration.layer_names) == rows else \
        [f"σ block {k}" if family != "sigma_residual" else f"γ {k}" for k in range(rows)]
    bound = max(float(np.abs(gamma).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(2.6 + 1.1 * columns, 1.0 + 0.2 * rows))
    shown = ax.imshow(gamma, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(columns), xlabels, fontsize=8)
    ax.set_yticks(range(rows), names, fontsize=6 if rows > 30 else 7)
    fig.colorbar(shown, ax=ax, label="γ")
    ax.set_title(f"γ, {family} ({label})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def panel_figure(reference: np.ndarray | None, images: dict[str, np.ndarray], title: str,
                 reference_label: str = "reference") -> bytes:
    """The reference, each image, and ``|image − reference|`` maps under them (PSNR against the reference, its
    maximum as the peak, in the titles); one row of images when there is no reference.

    Shape: ``reference`` (or None) and every image ``(h, w)``, on one scale.
    """
    plt = _pyplot()
    columns = ([(reference_label, reference)] if reference is not None else []) + list(images.items())
    rows = 2 if reference is not None else 1
    vmax = float(np.percentile(reference if reference is not None else next(iter(images.values())), 99.5))
    fig, axes = plt.subplots(rows, len(columns), figsize=(3.0 * len(columns), 3.1 * rows), squeeze=False)
    errors = {m: np.abs(im - reference) for m, im in images.items()} if reference is not None else {}
    emax = max((float(np.percentile(e, 99.5)) for e in errors.values()), default=1.0) or 1.0
    for col, (name, image) in enumerate(columns):
        axes[0, col].imshow(image, cmap="gray", vmin=0, vmax=vmax)
        label = name
        if reference is not None and name != reference_label:
            label += f"\nPSNR {psnr(reference, image):.2f} dB"
        axes[0, col].set_title(label, fontsize=9)
        if rows == 2:
            if name == reference_label:
                axes[1, col].axis("off")
            else:
                axes[1, col].imshow(errors[name], cmap="magma", vmin=0, vmax=emax)
                axes[1, col].set_title(f"|error| {name}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def matrix_heatmap(values: np.ndarray, rows: list[str], columns: list[str], title: str,
                   notes: np.ndarray | None = None) -> bytes:
    """A priors × domains heatmap of ``values`` (NaN: not defined or not finished), each cell annotated.

    Shape: ``values`` ``(len(rows), len(columns))``; ``notes`` the same shape of strings (default: the values).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.9 * len(columns) + 2.0, 1.1 * len(rows) + 1.4))
    finite = values[np.isfinite(values)]
    span = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=-span, vmax=span)
    for i in range(len(rows)):
        for j in range(len(columns)):
            text = notes[i, j] if notes is not None else ("—" if not np.isfinite(values[i, j]) else f"{values[i, j]:.2f}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("test domain")
    ax.set_ylabel("prior")
    ax.set_title(title, fontsize=9)
    return _png(fig)
