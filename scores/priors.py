"""Priors by name or path: the bundled checkpoints (``scores/weights/NAME.safetensors``) and loading.

Every script that takes a prior takes ``--prior NAME|PATH``: ``NAME`` is a bundled prior (a file of
the package's ``weights`` folder, listed by :func:`bundled_priors`), ``PATH`` a checkpoint file.
:func:`resolve_prior` turns either into a file, :func:`load_prior` into a frozen model with its
identity (the sha256 of the file, which records and site profiles name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from scores.checkpoints import CheckpointError, load_checkpoint
from scores.model import ScoreModel

__all__ = ["WEIGHTS_DIR", "DEFAULT_PRIOR", "PRIOR_HELP", "bundled_priors", "resolve_prior", "choose_prior",
           "file_sha256", "LoadedPrior", "load_prior"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""The package's bundled checkpoints (package data, so also in a non-editable install)."""

DEFAULT_PRIOR = "source_brain"
"""The prior the scripts use without ``--prior``."""


PRIOR_HELP = ("a bundled prior ({names}) or a checkpoint file; default: the prior the site names (its key "
              "'prior': brain sites colin27_t1, knee sites stanford_knee, the template sites source_brain), "
              "else " + DEFAULT_PRIOR)
"""``--help`` text of ``--prior`` (format with ``names``)."""


def bundled_priors() -> list[str]:
    """Names of the bundled priors: the stems of ``weights/*.safetensors``, sorted."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def resolve_prior(value: str | Path) -> Path:
    """The checkpoint of ``--prior NAME|PATH``: a bundled name, else an existing path (what it holds is
    checked when it is loaded, :func:`scores.checkpoints.load_checkpoint`).

    Raises:
        CheckpointError: neither a bundled name nor an existing path (one sentence naming ``--prior``).
    """
    text = str(value)
    if text in bundled_priors():
        return WEIGHTS_DIR / f"{text}.safetensors"
    path = Path(text).expanduser()
    if path.exists():
        return path
    raise CheckpointError(
        f"command line: key '--prior' is {text!r}, expected a bundled prior ({', '.join(bundled_priors()) or 'none'}) "
        f"or an existing checkpoint file."
    )


def choose_prior(command_line: str | None, site: str, site_prior: str | None,
                 site_file: str = "") -> tuple[Path, str]:
    """The prior a run uses, and why: ``--prior`` when given, else the site's ``prior`` key, else
    :data:`DEFAULT_PRIOR`.

    Args:
        command_line: ``--prior`` (``None`` when not given); site: the site's name;
        site_prior: the site config's ``prior`` key; site_file: where that key was read (for errors).

    Returns:
        The checkpoint file and one phrase saying which prior and why (for the run summary).

    Raises:
        CheckpointError: a bad ``--prior``, or a site whose ``prior`` key names neither a bundled prior
            nor an existing file (one sentence naming the site file and the key).
    """
    if command_line is not None:
        return resolve_prior(command_line), f"{command_line} (--prior on the command line)"
    if site_prior is None:
        return resolve_prior(DEFAULT_PRIOR), f"{DEFAULT_PRIOR} (the toolkit's default: site {site} names no prior)"
    try:
        path = resolve_prior(site_prior)
    except CheckpointError:
        raise CheckpointError(
            f"{site_file or site}: key 'prior' is {site_prior!r}, expected a bundled prior "
            f"({', '.join(bundled_priors()) or 'none'}) or an existing checkpoint file (or pass --prior)."
        ) from None
    return path, f"{site_prior} (named by site {site}, key 'prior'; --prior overrides it)"


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks): the identity of a prior checkpoint."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedPrior:
    """A frozen prior and its identity.

    Attributes:
        model: the :class:`ScoreModel` in eval mode, weights frozen (``denoise(x, sigma)``).
        path: the checkpoint file; sha256: its digest; device: where the model is.
    """

    model: ScoreModel
    path: Path
    sha256: str
    device: torch.device


def load_prior(value: str | Path, device: torch.device | str = "cpu",
               gradient_checkpointing: bool = False) -> LoadedPrior:
    """Load ``--prior NAME|PATH`` (safetensors, never a pickle) and freeze its weights; optionally
    recompute its blocks in backward (gradient checkpointing: less memory for calibration, more time).

    Raises:
        CheckpointError: an unknown name, a missing, pickled or mismatching checkpoint.
    """
    path = resolve_prior(value)
    model, _ = load_checkpoint(path, device=device)
    model.requires_grad_(False)
    model.set_gradient_checkpointing(gradient_checkpointing)
    return LoadedPrior(model.eval(), path, file_sha256(path), torch.device(device))
