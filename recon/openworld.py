"""The open-world matrix: every prior on every domain, each method per slice, resumable and shardable.

A matrix (:class:`MatrixSpec`, read from ``configs/open_world.yaml``) names priors, test *domains*
(a site, its overrides and its anatomy) and *cells* ``(prior, domain, acceleration)``. The work is cut
into *units*, one slice each, whose result is a small JSON *record* written atomically:

* classical units ``(domain, acceleration, method, λ, slice)`` — computed once per domain and
  acceleration, shared by every prior; the oracle λ of ``l1wavelet`` / ``tv`` is chosen afterwards on
  the very slices scored (against the clean reference), the "oracle" rows;
* prior units ``(cell, method, slice)`` — a method of :data:`recon.methods.METHODS` run by
  :class:`recon.biasrecon.BiasRecon` on that slice alone (per-scan adaptation). A SURE method also writes
  its no-SURE twin (``unadapted_sure`` → ``unadapted``, ``biasrecon`` → ``biasrecon_nosure``): the
  λ-step's unperturbed copy is that method's chain (``BiasReconResult.fixed_image``).

Any number of processes (two shells, or ``torchrun --nproc_per_node N``) work through the same unit list:
each *claims* a unit with an exclusive file before it starts (``O_CREAT | O_EXCL``; a claim of a process
that is gone is taken over), so finished units are skipped and none is done twice. :func:`aggregate`
turns the records into the tables: mean ± std per method and cell, headroom (the domain's own prior minus
this prior, unadapted) and closure ((method − unadapted) / headroom, on the method's slices).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from recon.atomic import write_bytes, write_text
from recon.biasrecon import BiasRecon, BiasReconSettings
from recon.coils import ESPIRIT_BLOCK, MAP_BLOCKS, sensitivity_maps
from recon.config import settings_from_dotlist
from recon.data import Sample, load_site, site_dataset
from recon.data.transforms import center_crop
from recon.errors import InputError
from recon.methods import (
    CLASSICAL_METHODS,
    METHODS,
    SCORED_AGAINST,
    TUNABLE_METHODS,
    prior_settings,
    reference_stack,
    run_baseline,
    slice_scores,
)
from recon.operators import Sense

__all__ = ["Domain", "Cell", "MatrixSpec", "Unit", "load_matrix", "units", "claim", "run_unit", "aggregate",
           "TWINS"]

TWINS: dict[str, str] = {"unadapted_sure": "unadapted", "biasrecon": "biasrecon_nosure"}
"""A SURE method → the method its λ-step's unperturbed copy is (recorded from the same run)."""


@dataclass(frozen=True)
class Domain:
    """A test domain: a site, its overrides (omegaconf dotlist), its anatomy and its own prior (or None)."""

    name: str
    site: str
    overrides: tuple[str, ...]
    anatomy: str
    own_prior: str | None
    center_fractions: tuple[tuple[int, float], ...] = ()
    """``(acceleration, centre fraction)`` pairs replacing fastMRI's pairing (0.32 / R) at those accelerations."""


@dataclass(frozen=True)
class Cell:
    """A prior on a domain at an acceleration; ``methods`` the prior methods run on it (``slices`` each,
    ``adaptation_slices`` for the competing adaptation methods and the oracle)."""

    prior: str
    domain: str
    acceleration: int
    methods: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.prior}__{self.domain}__{self.acceleration}x"


@dataclass(frozen=True)
class MatrixSpec:
    """The matrix: priors ``{name: bundled name or checkpoint path}``, domains, cells, the classical methods
    and their oracle λ grid, slice counts, and the :class:`BiasReconSettings` every prior method starts from."""

    priors: dict[str, str]
    domains: dict[str, Domain]
    cells: tuple[Cell, ...]
    classical: tuple[str, ...]
    oracle_grid: tuple[float, ...]
    slices: int
    adaptation_slices: int
    adaptation_methods: tuple[str, ...]
    settings: BiasReconSettings = field(default_factory=BiasReconSettings)
    source: str = ""
    maps_block: str = ESPIRIT_BLOCK  # ESPIRiT's calibration block (recon.coils.MAP_BLOCKS)

    def slices_of(self, method: str) -> int:
        return self.adaptation_slices if method in self.adaptation_methods else self.slices

    def domain_key(self, domain: str, acceleration: int) -> str:
        return f"{domain}__{acceleration}x"

    def site_overrides(self, domain: str, acceleration: int) -> list[str]:
        d = self.domains[domain]
        centre = dict(d.center_fractions).get(acceleration)
        return list(d.overrides) + [f"acquisition.acceleration={acceleration}"] + \
            ([] if centre is None else [f"acquisition.center_fraction={centre}"])


def _need(node: Any, key: str, where: str) -> Any:
    if key not in node or node[key] is None:
        raise InputError(f"{where}: key '{key}' is missing.")
    return node[key]


def load_matrix(path: str | os.PathLike, overrides: Sequence[str] = ()) -> MatrixSpec:
    """Read and check a matrix config (YAML; ``overrides`` an omegaconf dotlist).

    Raises:
        InputError: a missing or unreadable file, a missing key, an unknown method, prior or domain.
    """
    path = Path(path)
    try:
        cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except Exception as exc:  # noqa: BLE001 - any YAML or I/O problem is the user's file
        raise InputError(f"{path}: cannot be read as a matrix config ({exc}).") from None
    cfg = OmegaConf.to_container(cfg, resolve=True)
    where = str(path)
    priors = {str(k): str(v) for k, v in _need(cfg, "priors", where).items()}
    domains = {}
    for name, d in _need(cfg, "domains", where).items():
        own = d.get("own_prior")
        if own is not None and own not in priors:
            raise InputError(f"{where}: key 'domains.{name}.own_prior' is {own!r}, expected one of {', '.join(priors)}.")
        centres = d.get("center_fractions") or {}
        try:
            centres = tuple((int(a), float(f)) for a, f in centres.items())
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{where}: key 'domains.{name}.center_fractions' is {centres!r}, expected a mapping "
                             f"acceleration: fraction.") from None
        domains[name] = Domain(name, str(_need(d, "site", f"{where} domains.{name}")),
                               tuple(str(o) for o in d.get("overrides", [])),
                               str(_need(d, "anatomy", f"{where} domains.{name}")), own, centres)
    methods = _need(cfg, "methods", where)
    classical = tuple(_need(methods, "classical", f"{where} methods"))
    every = tuple(_need(methods, "every_cell", f"{where} methods"))
    adaptation = tuple(_need(methods, "cross_anatomy", f"{where} methods"))
    for name in classical:
        if name not in CLASSICAL_METHODS:
            raise InputError(f"{where}: key 'methods.classical' names {name!r}, expected one of "
                             f"{', '.join(CLASSICAL_METHODS)}.")
    for name in every + adaptation:
        if name not in METHODS or METHODS[name].kind != "prior":
            raise InputError(f"{where}: key 'methods' names {name!r}, expected a prior method of recon.methods.")
    cells = []
    for i, c in enumerate(_need(cfg, "cells", where)):
        prior, domain = str(_need(c, "prior", f"{where} cells[{i}]")), str(_need(c, "domain", f"{where} cells[{i}]"))
        if prior not in priors or domain not in domains:
            raise InputError(f"{where}: cells[{i}] is ({prior}, {domain}), expected a prior of 'priors' and a "
                             f"domain of 'domains'.")
        acceleration = int(c.get("acceleration", 4))
        if c.get("only") is not None:
            run = tuple(c["only"])
        else:
            cross = domains[domain].anatomy != _prior_anatomy(prior, domains)
            run = every + (adaptation if cross else ())
        cells.append(Cell(prior, domain, acceleration, run))
    settings = settings_from_dotlist([f"{k}={json.dumps(v) if isinstance(v, list) or v is None else v}"
                                      for k, v in (cfg.get("settings") or {}).items()])
    block = str(cfg.get("maps_block", ESPIRIT_BLOCK))
    if block not in MAP_BLOCKS:
        raise InputError(f"{where}: key 'maps_block' is {block!r}, expected one of {', '.join(MAP_BLOCKS)}.")
    return MatrixSpec(priors, domains, tuple(cells), classical, tuple(float(g) for g in _need(cfg, "oracle_grid", where)),
                      int(cfg.get("slices", 6)), int(cfg.get("adaptation_slices", 4)), adaptation, settings,
                      source=str(path), maps_block=block)


def _prior_anatomy(prior: str, domains: dict[str, Domain]) -> str | None:
    """The anatomy a prior was trained on: that of the domain whose own prior it is."""
    return next((d.anatomy for d in domains.values() if d.own_prior == prior), None)


def is_cross_anatomy(spec: MatrixSpec, cell: Cell) -> bool:
    return spec.domains[cell.domain].anatomy != _prior_anatomy(cell.prior, spec.domains)


# --------------------------------------------------------------------------------------------
# units and claims
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One slice of one method: classical (``cell`` None, ``lam`` the grid point or None) or prior."""

    domain: str
    acceleration: int
    method: str
    slice: int
    cell: Cell | None = None
    lam: float | None = None

    @property
    def group(self) -> str:
        """What the progress bar counts under: the cell, or the domain's classical rows."""
        return self.cell.key if self.cell else f"classical {self.domain} {self.acceleration}x"

    def record_path(self, out: Path) -> Path:
        if self.cell is None:
            lam = "" if self.lam is None else f"_lam{self.lam:g}"
            return out / "records" / "classical" / f"{self.domain}__{self.acceleration}x" / f"{self.method}{lam}" \
                / f"{self.slice:03d}.json"
        return out / "records" / self.cell.key / self.method / f"{self.slice:03d}.json"


def units(spec: MatrixSpec) -> list[Unit]:
    """Every unit in working order: per cell (config order), the domain's classical units the first time the
    domain and acceleration appear, then the cell's prior methods in order, slice by slice."""
    out: list[Unit] = []
    seen = set()
    for cell in spec.cells:
        key = (cell.domain, cell.acceleration)
        if key not in seen:
            seen.add(key)
            for method in spec.classical:
                lams = spec.oracle_grid if method in TUNABLE_METHODS else (None,)
                out += [Unit(cell.domain, cell.acceleration, method, s, lam=lam)
                        for lam in lams for s in range(spec.slices)]
        for method in cell.methods:
            out += [Unit(cell.domain, cell.acceleration, method, s, cell=cell) for s in range(spec.slices_of(method))]
    return out


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's claim: trust it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path) -> bool:
    """Claim a unit (its record's path): create ``<record>.claim`` exclusively; a claim whose process is gone is
    taken over. True when this process now owns the unit."""
    lock = path.with_suffix(".claim")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
                stale = not _alive(int(owner["pid"]), str(owner["host"]))
            except (OSError, ValueError, KeyError):
                stale = False  # being written this instant
            if not stale:
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        return True
    return False


def release(path: Path) -> None:
    path.with_suffix(".claim").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# running a unit
# --------------------------------------------------------------------------------------------


def cached_maps(path: Path, sample: Callable[[], Sample], block: str = ESPIRIT_BLOCK) -> torch.Tensor:
    """The ESPIRiT maps of a slice (:func:`recon.coils.sensitivity_maps` with ESPIRiT's calibration ``block``),
    computed once and kept at ``path``:
    written through a per-process temp file and ``os.replace``, so processes sharing the folder never read half a
    file. ``sample`` is called only when ``path`` does not exist yet. Shape: ``(C, H, W)`` complex."""
    if path.exists():
        return torch.load(path)
    maps = sensitivity_maps(sample(), block=block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(maps, tmp)
    os.replace(tmp, path)
    return maps


class Workspace:
    """What units share inside one process: the domains' samples, their maps (cached on disk) and the priors."""

    def __init__(self, spec: MatrixSpec, out: Path, sampler: Any, load_prior: Any) -> None:
        self.spec, self.out, self.sampler, self.load_prior = spec, out, sampler, load_prior
        self.samples: dict[tuple[str, int], list[Sample]] = {}
        self.priors: dict[str, Any] = {}

    def sample(self, domain: str, acceleration: int, index: int) -> Sample:
        key = (domain, acceleration)
        if key not in self.samples:
            site = load_site(self.spec.domains[domain].site, self.spec.site_overrides(domain, acceleration))
            dataset = _locked_dataset(site, self.out / "data")
            if len(dataset) < self.spec.slices:
                raise InputError(f"site {site.name}: {len(dataset)} slices, expected at least {self.spec.slices} "
                                 f"(key 'slices' of {self.spec.source}).")
            self.samples[key] = [dataset[i] for i in range(self.spec.slices)]
        return self.samples[key][index]

    def maps(self, domain: str, acceleration: int, index: int) -> torch.Tensor:
        return cached_maps(self.out / "maps" / self.spec.maps_block / f"{domain}__{acceleration}x" / f"{index:03d}.pt",
                           lambda: self.sample(domain, acceleration, index), block=self.spec.maps_block)

    def prior(self, name: str) -> Any:
        if name not in self.priors:
            self.priors[name] = self.load_prior(self.spec.priors[name])
        return self.priors[name]


def _locked_dataset(site: Any, workdir: Path) -> Any:
    """The site's simulated files, simulated by one process at a time (the others wait and then read them)."""
    import fcntl

    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".simulate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return site_dataset(site, workdir=workdir, seed=0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _scores(sample: Sample, image: torch.Tensor) -> dict[str, float]:
    out = {}
    for against, (p, s) in slice_scores(sample, image).items():
        out[f"psnr_{against}"], out[f"ssim_{against}"] = p, s
    return out


def _save_image(ws: Workspace, unit: Unit, method: str, sample: Sample, image: torch.Tensor) -> None:
    """The first slice's magnitude at the reference's size (for the cell figures)."""
    if unit.slice != 0:
        return
    truth = sample.reference if sample.reference is not None else sample.target
    pred = center_crop(image.abs(), tuple(truth.shape[-2:])).numpy().astype(np.float32)
    folder = ws.out / "images" / (unit.cell.key if unit.cell else f"classical__{unit.domain}__{unit.acceleration}x")
    name = method + ("" if unit.lam is None else f"_lam{unit.lam:g}")
    _save_npy(folder / f"{name}.npy", pred)
    reference = ws.out / "images" / f"reference__{unit.domain}__{unit.acceleration}x.npy"
    if not reference.exists():  # the same truth for every method of the domain
        _save_npy(reference, truth.numpy().astype(np.float32))


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def run_unit(ws: Workspace, unit: Unit) -> dict[str, dict]:
    """Compute one unit and write its record(s) (and its twin's); returns ``{method: record}``."""
    sample = ws.sample(unit.domain, unit.acceleration, unit.slice)
    maps = ws.maps(unit.domain, unit.acceleration, unit.slice)
    facts = {"domain": unit.domain, "acceleration": unit.acceleration, "slice": unit.slice, "fname": sample.fname,
             "slice_idx": sample.slice_idx, "date": time.strftime("%Y-%m-%d"), "host": socket.gethostname()}
    start = time.perf_counter()
    if unit.cell is None:
        params = {} if unit.lam is None else {"lam": unit.lam}
        image = run_baseline(unit.method, sample, maps, **params).image
        record = {**facts, "method": unit.method, "lam": unit.lam, "seconds": time.perf_counter() - start,
                  **_scores(sample, image)}
        _save_image(ws, unit, unit.method, sample, image)
        write_text(unit.record_path(ws.out), json.dumps(record, indent=1))
        return {unit.method: record}
    cell = unit.cell
    st = prior_settings(ws.spec.settings, unit.method)
    op = Sense(maps[None], sample.mask[None, None])
    reference = reference_stack([sample]) if st.calib_loss == "reference" else None
    result = BiasRecon(ws.prior(cell.prior), op, sample.kspace[None], st, sampler=ws.sampler,
                       reference=reference).run(progress=False)
    seconds = time.perf_counter() - start
    facts = {**facts, "prior": cell.prior, "cell": cell.key, "num_adapted": result.num_adapted,
             "val_loss_zero": result.val_loss_zero, "val_loss_best": result.val_loss_best,
             "chain_lam": result.chain_lam, "num_steps": st.num_steps}
    records = {unit.method: {**facts, "method": unit.method, "lam": result.lam, "seconds": seconds,
                             **_scores(sample, result.image[0, 0])}}
    _save_image(ws, unit, unit.method, sample, result.image[0, 0])
    twin = TWINS.get(unit.method)
    if twin is not None and st.sure:
        records[twin] = {**facts, "method": twin, "lam": result.chain_lam, "seconds": None, "shared_with": unit.method,
                         **_scores(sample, result.fixed_image[0, 0])}
        _save_image(ws, unit, twin, sample, result.fixed_image[0, 0])
        twin_unit = dataclasses.replace(unit, method=twin)
        write_text(twin_unit.record_path(ws.out), json.dumps(records[twin], indent=1))
    write_text(unit.record_path(ws.out), json.dumps(records[unit.method], indent=1))
    return records


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------


def _read(folder: Path, count: int) -> list[dict] | None:
    """The records ``000 … count−1`` of a folder, or None while any is missing."""
    records = []
    for s in range(count):
        path = folder / f"{s:03d}.json"
        if not path.exists():
            return None
        records.append(json.loads(path.read_text()))
    return records


def _summary(records: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(records)}
    for against in SCORED_AGAINST:
        for metric in ("psnr", "ssim"):
            values = [r.get(f"{metric}_{against}") for r in records]
            if all(v is not None for v in values):
                out[f"{metric}_{against}"] = (float(np.mean(values)), float(np.std(values)))
    seconds = [r["seconds"] for r in records if r.get("seconds") is not None]
    out["seconds"] = float(np.mean(seconds)) if seconds else None
    out["shared_with"] = records[0].get("shared_with")
    out["num_adapted"] = records[0].get("num_adapted", 0)
    out["per_slice"] = [r.get("psnr_reference", r.get("psnr_target")) for r in records]
    out["lams"] = [r.get("lam") for r in records]
    out["held_out"] = [(r.get("val_loss_zero"), r.get("val_loss_best")) for r in records]
    return out


def classical_rows(spec: MatrixSpec, out: Path, domain: str, acceleration: int) -> dict[str, dict]:
    """``{method: summary}`` of the classical methods on a domain (the oracle λ chosen against the reference
    where the files store it, else the target; ``"oracle_lam"``, ``"edge"`` in the summary)."""
    rows = {}
    base = out / "records" / "classical" / f"{domain}__{acceleration}x"
    for method in spec.classical:
        if method not in TUNABLE_METHODS:
            records = _read(base / method, spec.slices)
            if records is not None:
                rows[method] = {**_summary(records), "total_seconds": sum(r["seconds"] for r in records)}
            continue
        per_lam = {lam: _read(base / f"{method}_lam{lam:g}", spec.slices) for lam in spec.oracle_grid}
        if any(r is None for r in per_lam.values()):
            continue
        against = "reference" if all(r.get("psnr_reference") is not None for rs in per_lam.values() for r in rs) \
            else "target"
        best = max(spec.oracle_grid, key=lambda lam: np.mean([r[f"psnr_{against}"] for r in per_lam[lam]]))
        total = sum(r["seconds"] for rs in per_lam.values() for r in rs)
        rows[method] = {**_summary(per_lam[best]), "oracle_lam": best, "total_seconds": total,
                        "edge": best in (min(spec.oracle_grid), max(spec.oracle_grid))}
    return rows


def aggregate(spec: MatrixSpec, out: Path) -> dict[str, Any]:
    """Every finished method of every cell, with headroom and closure; ``{"cells": {key: {...}}}``.

    Headroom of a cell = (unadapted PSNR of the domain's own prior at that acceleration) − (this prior's
    unadapted PSNR), on the same slices, against the reference; closure of a method =
    mean over its slices of (method − unadapted) / headroom, reported where headroom > 0.
    """
    cells: dict[str, Any] = {}
    for cell in spec.cells:
        rows = {}
        for method in list(cell.methods) + [TWINS[m] for m in cell.methods if m in TWINS]:
            records = _read(out / "records" / cell.key / method, spec.slices_of(method))
            if records is not None:
                rows[method] = {**_summary(records), "total_seconds": sum(r["seconds"] or 0 for r in records)}
        cells[cell.key] = {"cell": cell, "rows": rows, "cross": is_cross_anatomy(spec, cell),
                           "classical": classical_rows(spec, out, cell.domain, cell.acceleration)}
    for key, entry in cells.items():
        cell = entry["cell"]
        own = spec.domains[cell.domain].own_prior
        own_cell = next((c for c in spec.cells if c.prior == own and c.domain == cell.domain
                         and c.acceleration == cell.acceleration), None)
        entry["headroom"] = None
        unadapted = entry["rows"].get("unadapted")
        if own_cell is not None and unadapted is not None:
            own_unadapted = cells[own_cell.key]["rows"].get("unadapted")
            if own_unadapted is not None:
                entry["headroom"] = float(np.mean(own_unadapted["per_slice"]) - np.mean(unadapted["per_slice"]))
        for method, row in entry["rows"].items():
            row["gain"] = row["closure"] = None
            if unadapted is None:
                continue
            n = row["n"]
            row["gain"] = float(np.mean(np.subtract(row["per_slice"], unadapted["per_slice"][:n])))
            if entry["headroom"] is not None and entry["headroom"] > 0:
                row["closure"] = row["gain"] / entry["headroom"]
    return {"cells": cells}


def cpu_seconds(entry: dict[str, Any]) -> float:
    """Seconds of computation recorded in a cell's prior units (its classical rows are the domain's)."""
    return float(sum(row["total_seconds"] for row in entry["rows"].values()))


def iterate_pending(spec: MatrixSpec, out: Path) -> Iterator[Unit]:
    """Units without a record, in working order."""
    for unit in units(spec):
        if not unit.record_path(out).exists():
            yield unit


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------

LABELS = {"zero_filled": "zero-filled", "sense": "SENSE", "l1wavelet": "L1-wavelet (oracle λ)",
          "tv": "TV (oracle λ)", "unadapted": "unadapted", "unadapted_sure": "unadapted + SURE",
          "biasrecon": "BiasRecon", "biasrecon_nosure": "BiasRecon w/o SURE", "finetune": "full fine-tuning",
          "lora": "LoRA r=4", "learned_lam": "learned λ", "oracle_gamma": "oracle γ (bound)"}
"""How the report names the methods."""

COLUMNS = ("zero_filled", "sense", "l1wavelet", "tv", "unadapted", "unadapted_sure", "biasrecon", "biasrecon_nosure",
           "finetune", "lora", "learned_lam", "oracle_gamma")


def _mean(row: dict | None, against: str, metric: str = "psnr") -> str:
    if row is None or f"{metric}_{against}" not in row:
        return "…"
    m, s = row[f"{metric}_{against}"]
    return f"{m:.2f} ± {s:.2f}" if metric == "psnr" else f"{m:.3f} ± {s:.3f}"


def _cell_label(spec: MatrixSpec, entry: dict) -> str:
    cell = entry["cell"]
    return f"{cell.prior} → {cell.domain} {cell.acceleration}×" + (" ✱" if entry["cross"] else "")


def _expected(spec: MatrixSpec, entry: dict) -> set[str]:
    """The methods a cell will have when finished: the classical ones, its prior methods and their twins."""
    methods = entry["cell"].methods
    return set(spec.classical) | set(methods) | {TWINS[m] for m in methods if m in TWINS}


def _rows_of(entry: dict) -> dict[str, dict]:
    return {**entry["classical"], **entry["rows"]}


def report_markdown(spec: MatrixSpec, agg: dict[str, Any], command: str, machine: str) -> str:
    """The matrix as markdown: PSNR vs the clean reference and vs the target (mean ± std), SSIM, headroom,
    closure, adapted variables and seconds per slice. ``…`` marks a method not (yet) finished."""
    cells = agg["cells"]
    lines = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({machine}). ✱ cross-anatomy cell. "
             f"Slices: {spec.slices} per cell (the first of each domain's test split), {spec.adaptation_slices} for "
             f"{', '.join(LABELS[m] for m in spec.adaptation_methods)}; each slice adapted alone. "
             f"Prior methods: {spec.settings.num_steps} noise levels, {spec.settings.num_samples} sample(s), "
             f"chain λ {spec.settings.lam:g}; ESPIRiT maps from the {spec.maps_block} calibration block. "
             f"Oracle rows: λ chosen on the very slices scored.", ""]
    for against, title in (("reference", "PSNR (dB) vs the clean reference"), ("target", "PSNR (dB) vs the fastMRI target (RSS of the noisy data)")):
        lines += [f"### {title}", "", "| cell | " + " | ".join(LABELS[c] for c in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for entry in cells.values():
            rows = _rows_of(entry)
            expected = _expected(spec, entry)
            lines.append(f"| {_cell_label(spec, entry)} | " + " | ".join(
                _mean(rows.get(c), against) if c in expected else "—" for c in COLUMNS) + " |")
        lines.append("")
    lines += ["### SSIM vs the clean reference", "", "| cell | " + " | ".join(LABELS[c] for c in COLUMNS) + " |",
              "|---|" + "---:|" * len(COLUMNS)]
    for entry in cells.values():
        rows = _rows_of(entry)
        expected = _expected(spec, entry)
        lines.append(f"| {_cell_label(spec, entry)} | " + " | ".join(
            _mean(rows.get(c), "reference", "ssim") if c in expected else "—" for c in COLUMNS) + " |")
    lines += ["", "### Headroom and closure", "",
              "Headroom = the domain's own prior (unadapted) − this prior (unadapted), dB vs the reference; gain = "
              "method − unadapted on the method's slices; closure = gain / headroom (where headroom > 0).", "",
              "| cell | headroom (dB) | " + " | ".join(f"{LABELS[m]} gain / closure" for m in
                                                       ("unadapted_sure", "biasrecon", "biasrecon_nosure", "finetune",
                                                        "lora", "learned_lam", "oracle_gamma")) + " | best oracle TV/L1 − unadapted |",
              "|---|---:|" + "---:|" * 8]
    for entry in cells.values():
        rows = entry["rows"]
        head = "—" if entry["headroom"] is None else f"{entry['headroom']:+.2f}"

        def gc(m: str) -> str:
            row = rows.get(m)
            if row is None or row.get("gain") is None:
                return "…" if m in _expected(spec, entry) else "—"
            return f"{row['gain']:+.2f}" + ("" if row.get("closure") is None else f" / {100 * row['closure']:.0f} %")

        classical = [entry["classical"][m] for m in ("l1wavelet", "tv") if m in entry["classical"]]
        unadapted = rows.get("unadapted")
        gap = "…" if not classical or unadapted is None else \
            f"{max(r['psnr_reference'][0] if 'psnr_reference' in r else r['psnr_target'][0] for r in classical) - np.mean(unadapted['per_slice']):+.2f}"
        lines.append(f"| {_cell_label(spec, entry)} | {head} | " + " | ".join(
            gc(m) for m in ("unadapted_sure", "biasrecon", "biasrecon_nosure", "finetune", "lora", "learned_lam",
                            "oracle_gamma")) + f" | {gap} |")
    lines += ["", "### Cost", "", "Adapted variables and seconds per slice (one process, one thread, this machine); "
              "a twin row (no SURE) comes from its SURE run at no extra cost. CPU time per cell = the sum over its prior "
              "units (the domain's classical rows are shared by the cells of that domain).", "",
              "| cell | " + " | ".join(LABELS[m] for m in ("unadapted_sure", "biasrecon", "finetune", "lora",
                                                            "learned_lam", "oracle_gamma")) + " | CPU time of the cell |",
              "|---|" + "---:|" * 7]
    for entry in cells.values():
        rows = entry["rows"]

        def cost(m: str) -> str:
            row = rows.get(m)
            if row is None:
                return "…" if m in entry["cell"].methods else "—"
            return f"{row['num_adapted']:,} var., {row['seconds']:.0f} s"

        lines.append(f"| {_cell_label(spec, entry)} | " + " | ".join(
            cost(m) for m in ("unadapted_sure", "biasrecon", "finetune", "lora", "learned_lam", "oracle_gamma"))
            + f" | {cpu_seconds(entry) / 60:.0f} min |")
    lines += ["", "### Oracle λ of the classical rows", "", "| domain | L1-wavelet λ | TV λ | classical CPU time |",
              "|---|---:|---:|---:|"]
    seen = set()
    for entry in cells.values():
        cell = entry["cell"]
        if (cell.domain, cell.acceleration) in seen:
            continue
        seen.add((cell.domain, cell.acceleration))
        c = entry["classical"]

        def lam(m: str) -> str:
            if m not in c:
                return "…"
            return f"{c[m]['oracle_lam']:g}" + (" (edge)" if c[m]["edge"] else "")

        total = sum(r["total_seconds"] for r in c.values())
        lines.append(f"| {cell.domain} {cell.acceleration}× | {lam('l1wavelet')} | {lam('tv')} | {total / 60:.0f} min |")
    return "\n".join(lines) + "\n"
