"""Site profiles: a fitted γ saved for one site and one prior, and its validated load.

A profile is a JSON file of a few hundred bytes: the site, the prior it belongs to (the sha256 of
the checkpoint), the calibration's shape (its family, layer count and a digest of the layer names, band edges
for the ``bands`` family, the schedule's σ range for the per-level families) and γ (float32, base64: exact round
trip). A file without ``family`` is a ``bands`` profile (the first version). :func:`load_profile` checks the file's structure;
:func:`apply_profile` and :func:`calibrated_prior` check that it fits a calibration of a prior
(same prior, layers and bands) — the one way a saved γ comes back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recon.adapt.families import FAMILIES, CalibratedPrior, CalibrationShape
from recon.atomic import write_text
from recon.errors import InputError

__all__ = ["PROFILE_FORMAT", "SiteProfile", "save_profile", "load_profile", "apply_profile", "calibrated_prior"]

PROFILE_FORMAT: str = "biasrecon.site_profile"
_PROFILE_VERSION = 1


def _layers_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SiteProfile:
    """A saved calibration of one site for one prior.

    Attributes:
        site: The site's name.
        prior: The prior it belongs to (a checkpoint name or sha256).
        num_layers: ``L``.
        layers_sha256: First 16 hex digits of the sha256 of the newline-joined layer names.
        band_edges: The ``B − 1`` band boundaries (``bands`` family; empty for the others).
        gamma: float32 tensor of the family's shape (``(L, B)`` for ``bands``).
        extra: Free JSON metadata (e.g. the held-out loss reached).
        source: The file it was read from.
        family: The calibration family (:data:`recon.adapt.families.FAMILIES`).
        sigma_range: The schedule's ``(σ_start, σ_end)`` of a per-level family, else None.
        below: The noise level at and below which γ acts (``biasrecon.calibrate_below``), else None (every level).
    """

    site: str
    prior: str
    num_layers: int
    layers_sha256: str
    band_edges: tuple[float, ...]
    gamma: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    family: str = "bands"
    sigma_range: tuple[float, float] | None = None
    below: float | None = None


def save_profile(
    path: str | os.PathLike[str],
    calibration: nn.Module,
    site: str,
    prior: str,
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``calibration``'s ``γ`` as a site profile (JSON, a few hundred bytes), atomically.

    The layer names are stored as their count and a sha256 digest; ``γ`` as little-endian
    float32 in base64 (exact round trip).
    Shape: ``γ`` the family's shape.

    Args:
        path: Output file (the folder must exist); written through a temp file and ``os.replace``.
        calibration: The fitted calibration (any family of :mod:`recon.adapt.families`).
        site: Name of the site.
        prior: The prior the calibration belongs to (checkpoint name or sha256).
        extra: JSON-serialisable metadata.
        overwrite: If False, an existing ``path`` is an error.

    Returns:
        The path written.

    Raises:
        InputError: empty ``site``/``prior``, unserialisable ``extra``, missing folder, or an
            existing file with ``overwrite=False``.
    """
    path = Path(path)
    for key, value in (("site", site), ("prior", prior)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}: profile key {key!r} must be a non-empty string, got {value!r}.")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist; expected an existing folder.")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: the file exists; expected a new path or overwrite=True.")
    gamma = calibration.gamma.detach().cpu().to(torch.float32).numpy().astype("<f4")
    sigma_range = getattr(calibration, "sigma_range", None)
    record = {
        "format": PROFILE_FORMAT,
        "version": _PROFILE_VERSION,
        "site": site,
        "prior": prior,
        "family": calibration.family,
        "layers": {"count": len(calibration.layer_names), "sha256": _layers_digest(calibration.layer_names)},
        "band_edges": list(calibration.band_edges),
        **({"sigma_range": list(sigma_range)} if sigma_range is not None else {}),
        **({"below": calibration.below} if getattr(calibration, "below", None) is not None else {}),
        "gamma": {"shape": list(gamma.shape), "float32_base64": base64.b64encode(gamma.tobytes()).decode("ascii")},
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: profile key 'extra' must be JSON-serialisable ({err}).") from None
    write_text(path, text + "\n")
    return path


def load_profile(path: str | os.PathLike[str]) -> SiteProfile:
    """Read a site profile written by :func:`save_profile`.

    Shape: the profile's ``gamma`` is ``(L, B)`` float32.

    Raises:
        InputError: missing or unreadable file, not a profile, or a missing / malformed key —
            naming the file and the key.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: profile file does not exist; expected a JSON site profile.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot be read as JSON ({err}); expected a site profile.") from None
    if not isinstance(record, dict) or record.get("format") != PROFILE_FORMAT:
        raise InputError(f"{path}: key 'format' is not {PROFILE_FORMAT!r}; expected a site profile.")
    if record.get("version") != _PROFILE_VERSION:
        raise InputError(f"{path}: key 'version' is {record.get('version')!r}, expected {_PROFILE_VERSION}.")

    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        value = record.get(key)
        if not isinstance(value, kind):
            raise InputError(f"{path}: key {key!r} is missing or malformed (got {value!r}).")
        return value

    site, prior = need("site", str), need("prior", str)
    layers, gamma_rec = need("layers", dict), need("gamma", dict)
    edges, extra = need("band_edges", list), record.get("extra", {})
    try:
        count, digest = int(layers["count"]), str(layers["sha256"])
        shape = tuple(int(s) for s in gamma_rec["shape"])
        raw = base64.b64decode(gamma_rec["float32_base64"], validate=True)
        edges_t = tuple(float(e) for e in edges)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: key 'layers', 'gamma' or 'band_edges' is malformed ({err}).") from None
    family = record.get("family", "bands")
    if family not in FAMILIES:
        raise InputError(f"{path}: key 'family' is {family!r}, expected one of {', '.join(FAMILIES)}.")
    sigma_range = record.get("sigma_range")
    try:
        sigma_range = None if sigma_range is None else tuple(float(v) for v in sigma_range)
    except (TypeError, ValueError):
        sigma_range = ()
    if sigma_range is not None and len(sigma_range) != 2:
        raise InputError(f"{path}: key 'sigma_range' is {record.get('sigma_range')!r}, expected [sigma_start, sigma_end].")
    below = record.get("below")
    if below is not None and (isinstance(below, bool) or not isinstance(below, (int, float)) or not below > 0
                              or not np.isfinite(below)):
        raise InputError(f"{path}: key 'below' is {below!r}, expected a positive number (or no key: every level).")
    if family == "bands":
        fits = len(shape) == 2 and shape[0] == count and shape[1] == len(edges_t) + 1
        expected = f"(layers.count, len(band_edges) + 1) = ({count}, {len(edges_t) + 1})"
    else:
        fits, expected = 1 <= len(shape) <= 2, "a 1-D or 2-D shape"
    if not fits or len(raw) != 4 * int(np.prod(shape)):
        raise InputError(f"{path}: key 'gamma' holds {len(raw) // 4} values of shape {list(shape)}, expected {expected}.")
    gamma = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))
    if not bool(torch.isfinite(gamma).all()):
        raise InputError(f"{path}: key 'gamma' holds non-finite values.")
    if not isinstance(extra, dict):
        raise InputError(f"{path}: key 'extra' must be a JSON object, got {type(extra).__name__}.")
    return SiteProfile(site, prior, count, digest, edges_t, gamma, extra, str(path), family, sigma_range,
                       None if below is None else float(below))


def apply_profile(
    profile: SiteProfile | str | os.PathLike[str],
    calibration: FrequencyCalibration,
    prior: str | None = None,
) -> SiteProfile:
    """Load a site profile's ``γ`` into ``calibration`` after checking that it fits.

    Args:
        profile: A :class:`SiteProfile` or the path of one.
        calibration: A calibration of the same family and shape.
        prior: If given, the profile's ``prior`` must equal it.

    Returns:
        The profile applied.

    Raises:
        InputError: naming the file and the key (``prior``, ``family``, ``layers``, ``band_edges``,
            ``sigma_range``, ``below``, ``gamma``) that does not match.
    """
    if not isinstance(profile, SiteProfile):
        profile = load_profile(profile)
    src = profile.source or "site profile"
    if prior is not None and profile.prior != prior:
        raise InputError(f"{src}: key 'prior' is {profile.prior!r}, expected {prior!r}.")
    if profile.family != calibration.family:
        raise InputError(f"{src}: key 'family' is {profile.family!r}, expected this calibration's {calibration.family!r}.")
    own_range = getattr(calibration, "sigma_range", None)
    if own_range is not None and profile.sigma_range != tuple(own_range):
        raise InputError(f"{src}: key 'sigma_range' is {profile.sigma_range}, expected the schedule's {tuple(own_range)} "
                         f"(a per-level γ belongs to its noise levels).")
    own_below = getattr(calibration, "below", None)
    if profile.below != own_below:
        raise InputError(f"{src}: key 'below' is {profile.below}, expected this calibration's {own_below} "
                         f"(biasrecon.calibrate_below: the levels γ was fitted at).")
    names = calibration.layer_names
    if profile.num_layers != len(names) or profile.layers_sha256 != _layers_digest(names):
        raise InputError(
            f"{src}: key 'layers' describes {profile.num_layers} layers (sha256 {profile.layers_sha256}), expected "
            f"this calibration's {len(names)} layers (sha256 {_layers_digest(names)})."
        )
    if tuple(profile.band_edges) != tuple(calibration.band_edges):
        raise InputError(
            f"{src}: key 'band_edges' is {list(profile.band_edges)}, expected {list(calibration.band_edges)}."
        )
    calibration._load_gamma(profile.gamma, src)
    return profile


def calibrated_prior(profile: SiteProfile | str | os.PathLike[str], module: nn.Module, prior: str,
                     shape: CalibrationShape = CalibrationShape()) -> tuple[CalibratedPrior, SiteProfile]:
    """The validated load of a saved γ: the profile checked against ``module``'s calibration of ``shape`` and
    ``prior`` (its sha256), as a :class:`CalibratedPrior`.

    Shape: the profile's γ must have the calibration's shape.

    Raises:
        InputError: naming the file and the key that does not fit (``prior``, ``family``, ``layers``,
            ``band_edges``, ``sigma_range``, ``gamma``).
    """
    calibration = shape.build(module)
    applied = apply_profile(profile, calibration, prior=prior)
    value = CalibratedPrior(module, applied.gamma, shape, source=applied.source or "site profile")
    return value, applied
