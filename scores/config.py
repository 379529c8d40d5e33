"""Typed configuration schema of the prior (omegaconf structured dataclasses).

Scripts read YAML (``configs/prior/*.yaml``) into :class:`PriorConfig` with :func:`load_prior_config`;
the library itself takes the typed objects. Unknown keys and wrongly typed values are errors.

Intensity normalisation (used identically in training and reconstruction): the prior is trained
on, and expects, complex images scaled so that the 99th percentile of the magnitude of their
low-resolution (centre-of-k-space) image is 1. The data side does the scaling
(``recon.data.normalize.normalization_scale``); the model never rescales its input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "NetworkConfig",
    "SDEConfig",
    "TrainConfig",
    "DataConfig",
    "PriorConfig",
    "ConfigError",
    "load_prior_config",
    "prior_config_from_dict",
    "prior_config_to_dict",
]


class ConfigError(ValueError):
    """A prior configuration that does not fit the schema (unknown key, wrong type, bad value)."""


@dataclass
class NetworkConfig:
    """U-Net and preconditioning of the ScoreModel (see scores.networks.UNet, scores.model.ScoreModel)."""

    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attention: bool = True
    emb_channels: int = 0  # 0 means 4 * base_channels
    pad_mode: str = "reflect"
    gradient_checkpointing: bool = False
    sigma_data: float = 0.5  # per-real-channel std of normalised training images (EDM preconditioning)


@dataclass
class SDEConfig:
    """Noise schedule (scores.sde); sampling and training noise levels live in [sigma_min, sigma_max]."""

    kind: str = "ve"  # "ve" (geometric) or "vp" (linear beta, used through its VE noise levels)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3


@dataclass
class TrainConfig:
    """Denoising score matching (scores.train)."""

    steps: int = 4000
    batch_size: int = 32  # global batch, split over data-parallel processes
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 200
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    sigma_sampling: str = "lognormal"  # "lognormal" (EDM) or "loguniform" over [sigma_min, sigma_max]
    p_mean: float = -1.2
    p_std: float = 1.2
    augment_flips: bool = True
    augment_rotations: bool = True  # 90-degree rotations, only applied to square images
    checkpoint_every: int = 1000
    log_every: int = 10
    num_grid_samples: int = 16
    grid_sampler_steps: int = 50
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    mixed_precision: bool = False  # bf16 autocast, CUDA only
    patch_size: Optional[int] = None  # train on random square crops of this side (a fully convolutional prior)
    init_from: Optional[str] = None  # start from a prior's weights: a bundled name (scores/weights) or a path


@dataclass
class DataConfig:
    """Which training images (read by scripts/train_score.py through recon.data).

    A site (``site``; its ``split`` for image-stack sites, ``copies`` phase draws per slice), or a
    folder of fastMRI h5 files whose targets are the images (``folder``); ``val_split`` names the
    site's split whose denoising loss is logged at every checkpoint (``null``: none).
    """

    site: str = "source_brain"
    num_slices: Optional[int] = None
    seed: int = 0
    split: str = "train"
    val_split: Optional[str] = None
    copies: int = 1
    folder: Optional[str] = None


@dataclass
class PriorConfig:
    """Everything needed to rebuild and retrain a prior; stored in checkpoint metadata."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


_CHOICES = {
    ("network", "pad_mode"): ("reflect", "replicate", "zeros"),
    ("sde", "kind"): ("ve", "vp"),
    ("train", "sigma_sampling"): ("lognormal", "loguniform"),
}


def _validate(cfg: PriorConfig, source: str) -> PriorConfig:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{source}: key '{section}.{key}' is {value!r}, expected one of {list(choices)}.")
    positive = [
        ("network", "base_channels"),
        ("network", "num_res_blocks"),
        ("network", "sigma_data"),
        ("sde", "sigma_min"),
        ("train", "steps"),
        ("train", "batch_size"),
        ("train", "lr"),
        ("train", "checkpoint_every"),
        ("train", "log_every"),
        ("data", "copies"),
    ]
    for section, key in positive:
        value = getattr(getattr(cfg, section), key)
        if not value > 0:
            raise ConfigError(f"{source}: key '{section}.{key}' is {value!r}, expected a positive number.")
    if not cfg.network.channel_mults or any(m < 1 for m in cfg.network.channel_mults):
        raise ConfigError(f"{source}: key 'network.channel_mults' must be a non-empty list of positive integers.")
    if cfg.sde.sigma_max <= cfg.sde.sigma_min:
        raise ConfigError(f"{source}: key 'sde.sigma_max' must be larger than 'sde.sigma_min'.")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"{source}: key 'train.ema_decay' must be in [0, 1).")
    if cfg.train.patch_size is not None and cfg.train.patch_size < 8:
        raise ConfigError(f"{source}: key 'train.patch_size' is {cfg.train.patch_size}, expected null or an integer >= 8.")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"{source}: key 'train.betas' must be a list of two numbers.")
    return cfg


def _schema_message(source: str, what: str, exc: OmegaConfBaseException) -> str:
    detail = str(getattr(exc, "msg", "") or exc).strip()
    detail = detail.splitlines()[0] if detail else "invalid value"
    return f"{source}: {what} '{getattr(exc, 'full_key', '?')}' does not fit the prior schema ({detail})."


def _to_object(conf: DictConfig) -> PriorConfig:
    obj = OmegaConf.to_object(conf)
    assert isinstance(obj, PriorConfig)
    return obj


def load_prior_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PriorConfig:
    """Read a prior YAML (optional) and dotlist overrides onto the schema.

    Maths: not applicable. Shape: not applicable.

    Args:
        path: YAML file; None means the schema defaults.
        overrides: dotlist such as ``["train.steps=2000", "network.base_channels=16"]``.

    Raises:
        ConfigError: one sentence naming the file and key, for unknown keys, wrong types or bad values.
    """
    source = str(path) if path is not None else "prior config"
    schema = OmegaConf.structured(PriorConfig)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{source}: file not found, expected a prior config YAML.")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml raises many error types
            raise ConfigError(
                f"{source}: cannot be parsed as YAML ({type(exc).__name__}), expected a prior config."
            ) from None
        try:
            schema = OmegaConf.merge(schema, loaded)
        except OmegaConfBaseException as exc:
            raise ConfigError(_schema_message(source, "key", exc)) from None
    try:
        if overrides:
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_schema_message(source, "override key", exc)) from None
    return _validate(_to_object(schema), source)


def prior_config_from_dict(data: dict[str, Any], source: str = "prior config") -> PriorConfig:
    """Validate a plain dict (e.g. from checkpoint metadata) against the schema.

    Maths: not applicable. Shape: not applicable.

    Raises:
        ConfigError: for unknown keys, wrong types or bad values, naming ``source`` and the key.
    """
    try:
        conf = OmegaConf.merge(OmegaConf.structured(PriorConfig), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise ConfigError(_schema_message(source, "key", exc)) from None
    return _validate(_to_object(conf), source)


def prior_config_to_dict(cfg: PriorConfig) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (JSON-serialisable)."""
    return dataclasses.asdict(cfg)
