"""The adapt config: one structured schema, read from YAML and a command-line dotlist.

The ``biasrecon`` section *is* :class:`recon.biasrecon.BiasReconSettings`: its structured-config
schema (:data:`BiasReconSection`) is generated from the settings' fields, types and defaults, so
the YAML, the dotlist and the library read the same keys with the same (measured) defaults, and a
field added to the settings is a config key at once. The other sections say how a run uses the
optimizer (calibration shape, coil maps, batching, device, methods, mode).

``configs/biasrecon/default.yaml`` (shipped as package data, :func:`recon.resources.config_path`)
holds the schema's defaults, chosen for quality (``docs/results/speed_quality.md``); ``preset=fast``
(:data:`PRESETS`) lowers the CPU cost for demos. The methods of the run come from the method table
(:mod:`recon.methods`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recon.biasrecon import BiasReconSettings
from recon.coils import ESPIRIT_BLOCK, MAP_BLOCKS
from recon.errors import InputError
from recon.methods import METHODS, PRIOR_METHODS, prior_settings
from recon.resources import config_path

__all__ = [
    "BiasReconSection",
    "CalibrationSection",
    "AdaptConfig",
    "DEFAULT_CONFIG",
    "PRESETS",
    "omegaconf_message",
    "split_overrides",
    "load_config",
    "method_settings",
    "settings_from_dotlist",
]

DEFAULT_CONFIG: Path = config_path("biasrecon", "default.yaml")
"""The shipped adapt config (``configs/biasrecon/default.yaml``)."""

PRESETS: dict[str, dict[str, Any]] = {
    "quality": {},
    "fast": {"biasrecon": {"num_steps": 8, "num_samples": 1}},
}
"""The adapt config's presets: the keys each one sets (merged after the YAML, before the command line's keys).

``quality`` (the default) keeps the schema's defaults, the knee of the speed–quality curve; ``fast`` is the
CPU demo's 8 noise levels and one posterior sample (``docs/results/speed_quality.md`` says what it costs in dB).
"""


def _schema_type(hint: Any) -> Any:
    """The omegaconf type of a settings field: literals are strings, tuples lists, ``X | None`` Optional."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return List[args[0]]  # type: ignore[valid-type]
    if args and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    return hint


def _section_of(settings: type) -> type:
    """A structured-config dataclass with the fields, types and defaults of a frozen settings dataclass."""
    hints = typing.get_type_hints(settings)
    specs = []
    for f in dataclasses.fields(settings):
        default = f.default
        if isinstance(default, tuple):
            specs.append((f.name, _schema_type(hints[f.name]), field(default_factory=lambda d=default: list(d))))
        else:
            specs.append((f.name, _schema_type(hints[f.name]), field(default=default)))
    section = dataclasses.make_dataclass("BiasReconSection", specs)
    section.__module__ = __name__  # omegaconf and pickling look the class up by module
    section.__doc__ = f"The ``biasrecon`` section: :class:`{settings.__name__}` as a structured config."
    return section


BiasReconSection: type = _section_of(BiasReconSettings)
"""The ``biasrecon`` section: :class:`BiasReconSettings` as a structured config (same keys, same defaults)."""


@dataclass
class CalibrationSection:
    """Shape of the frequency calibration: ``layers`` layers × ``bands`` radial bands (< 100 values)."""

    layers: int = 24
    bands: int = 3


@dataclass
class AdaptConfig:
    """Schema of ``configs/biasrecon/*.yaml`` (unknown keys are errors)."""

    preset: str = "quality"  # a key of PRESETS: "quality" | "fast"
    biasrecon: Any = field(default_factory=BiasReconSection)  # BiasReconSection (a generated dataclass)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    maps: str = "espirit"  # "espirit" | "true"
    maps_block: str = ESPIRIT_BLOCK  # ESPIRiT's calibration block: "rectangle" | "square" (recon.coils.MAP_BLOCKS)
    batch_size: int = 4
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    methods: List[str] = field(default_factory=lambda: ["biasrecon", "unadapted"])
    mode: str = "scan"  # "scan" | "site"
    calib_slices: int = 4
    simulation_seed: int = 0
    gradient_checkpointing: bool = False  # recompute the score network's blocks in backward (less memory)


AdaptConfig.__annotations__["biasrecon"] = BiasReconSection  # omegaconf reads the section's schema from it


def omegaconf_message(exc: Exception, key: str | None = None) -> str:
    """``key '<dotted key>' (<first line of the message>)`` of an omegaconf error."""
    key = getattr(exc, "full_key", None) or key or "?"
    msg = str(getattr(exc, "msg", None) or exc).strip().splitlines()
    return f"key '{key}' ({msg[0].rstrip('.') if msg else type(exc).__name__})"


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` items into adapt-config overrides and site overrides (``site.`` stripped).

    Raises:
        InputError: an item that is not ``key=value``.
    """
    adapt, site = [], []
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"command line: override {item!r} is not key=value, expected e.g. biasrecon.num_steps=20.")
        if key.startswith("site."):
            site.append(item[len("site."):])
        else:
            adapt.append(item)
    return adapt, site


def method_settings(config: AdaptConfig, method: str) -> BiasReconSettings:
    """The typed library settings of one prior method: the ``biasrecon`` section with the method's changes.

    Raises:
        InputError: invalid settings (checked by :class:`BiasReconSettings`).
    """
    return prior_settings(BiasReconSettings(**dataclasses.asdict(config.biasrecon)), method)


def settings_from_dotlist(items: Sequence[str], where: str = "command line") -> BiasReconSettings:
    """:class:`BiasReconSettings` (library defaults) with ``key=value`` overrides of its fields, read
    through the same schema as the ``biasrecon`` section (e.g. ``num_steps=30``, ``lam_grid=[0.01,0.1]``).

    Raises:
        InputError: an unknown key, a value of the wrong type or an invalid value, naming ``where``.
    """
    cfg = OmegaConf.structured(BiasReconSection)
    for item in items:
        key, sep, _ = item.partition("=")
        try:
            if not sep:
                raise ValueError("not key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception as exc:  # omegaconf and yaml errors
            detail = omegaconf_message(exc, key) if isinstance(exc, OmegaConfBaseException) else str(exc)
            raise InputError(f"{where}: override {item!r} is not a BiasReconSettings field of the right type "
                             f"({detail}), expected e.g. num_steps=30.") from None
    values = OmegaConf.to_container(cfg)
    try:
        return BiasReconSettings(**values)
    except InputError as exc:
        raise InputError(f"{where}: {str(exc).rstrip('.')}.") from None


def _checked(cfg: Any, where: str) -> AdaptConfig:
    """The typed config of ``cfg``, its values checked; errors name ``where`` (the file or the command line).

    Raises:
        InputError: an unresolvable interpolation or an invalid value.
    """
    try:
        config: AdaptConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise InputError(f"{where}: {omegaconf_message(exc)} cannot be resolved, expected a plain value.") from None
    if isinstance(config.maps, str) and config.maps.lower() == "true":  # `maps=true` / `maps: true` read as a YAML boolean
        config.maps = "true"
    if config.maps not in ("espirit", "true"):
        raise InputError(f"{where}: key 'maps' is {config.maps!r}, expected 'espirit' or 'true'.")
    if config.maps_block not in MAP_BLOCKS:
        raise InputError(f"{where}: key 'maps_block' is {config.maps_block!r}, expected one of {', '.join(MAP_BLOCKS)}.")
    if config.preset not in PRESETS:
        raise InputError(f"{where}: key 'preset' is {config.preset!r}, expected one of {', '.join(PRESETS)}.")
    if config.device not in ("auto", "cpu", "cuda"):
        raise InputError(f"{where}: key 'device' is {config.device!r}, expected 'auto', 'cpu' or 'cuda'.")
    if config.mode not in ("scan", "site"):
        raise InputError(f"{where}: key 'mode' is {config.mode!r}, expected 'scan' or 'site'.")
    if config.batch_size < 1 or config.calib_slices < 1:
        raise InputError(
            f"{where}: keys 'batch_size' and 'calib_slices' are {config.batch_size} and {config.calib_slices}, "
            f"expected positive integers."
        )
    if not config.methods or any(m not in METHODS for m in config.methods):
        raise InputError(
            f"{where}: key 'methods' is {list(config.methods)}, expected a non-empty list of {', '.join(METHODS)}."
        )
    layers, bands = config.calibration.layers, config.calibration.bands
    if layers < 1 or bands < 1:
        raise InputError(
            f"{where}: keys 'calibration.layers' and 'calibration.bands' are {layers} and {bands}, "
            f"expected positive integers."
        )
    family, shape = config.biasrecon.calibration_family, CalibrationSection()
    if family != "bands" and (layers, bands) != (shape.layers, shape.bands):
        raise InputError(
            f"{where}: keys 'calibration.layers' and 'calibration.bands' are {layers} and {bands}, but they shape only "
            f"the bands family and 'biasrecon.calibration_family' is {family!r}; expected "
            f"biasrecon.calibration_family=bands with them, or their defaults {shape.layers} and {shape.bands}."
        )
    for method in config.methods:
        if method not in PRIOR_METHODS:
            continue
        try:
            method_settings(config, method)
        except InputError as exc:
            raise InputError(f"{where}: {str(exc).rstrip('.')}.") from None
    config.methods = list(dict.fromkeys(config.methods))
    return config


def load_config(path: Path, overrides: Sequence[str] = ()) -> AdaptConfig:
    """Read the adapt config: schema ← YAML ← preset ← dotlist; validate the values the library does not.

    The preset (key ``preset``, from the YAML or the command line) sets its keys (:data:`PRESETS`) over the
    YAML's; keys given on the command line override the preset's.

    The YAML is checked on its own first (errors name the file), then with the overrides (errors
    name the command line).

    Raises:
        InputError: unreadable YAML, unknown keys or wrong types (naming the file or the override),
            or invalid values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: key '--config' is not a file, expected an adapt config YAML (configs/biasrecon/).")
    schema = OmegaConf.structured(AdaptConfig)
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise InputError(
            f"{path}: cannot be parsed as YAML ({type(exc).__name__}), expected an adapt config."
        ) from None
    if not isinstance(loaded, DictConfig):
        raise InputError(f"{path}: holds a YAML list, expected a mapping of adapt config keys.")
    top = next(iter(loaded.keys()), None) if len(loaded) == 1 else None
    try:
        cfg = OmegaConf.merge(schema, loaded)
    except OmegaConfBaseException as exc:
        raise InputError(
            f"{path}: {omegaconf_message(exc, top)} is not in the adapt config schema or has the wrong type."
        ) from None
    _checked(cfg, str(path))
    merged = _with_overrides(cfg, overrides, path)
    preset = merged.preset
    if preset in PRESETS and PRESETS[preset]:  # the preset's keys, then the command line's again (they win)
        merged = _with_overrides(OmegaConf.merge(cfg, PRESETS[preset]), overrides, path)
    return _checked(merged, f"command line ({path} with overrides)")


def _with_overrides(cfg: Any, overrides: Sequence[str], path: Path) -> Any:
    """``cfg`` with the ``key=value`` overrides merged one at a time.

    Raises:
        InputError: an unknown key or a wrong type, naming the override.
    """
    for item in overrides:
        key = item.partition("=")[0]
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception as exc:  # omegaconf and yaml errors
            detail = omegaconf_message(exc, key) if isinstance(exc, OmegaConfBaseException) else type(exc).__name__
            raise InputError(
                f"command line: override {item!r} is unknown or has the wrong type ({detail}), expected a key of "
                f"{path.name} like biasrecon.num_steps=20 or a site key like site.acquisition.acceleration=8."
            ) from None
    return cfg
