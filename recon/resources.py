"""Where the shipped configs are: ``configs/`` travels as package data, the package ``recon.configs``.

In a checkout (editable install) ``recon.configs`` is the repository's ``configs/`` folder; in a
regular install it is the copy inside the installed package. Nothing here looks at the location of
a library file, so both work the same way (and ``pip install .`` needs no checkout).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from recon.errors import InputError

__all__ = ["CONFIG_PACKAGE", "configs_root", "config_path"]

CONFIG_PACKAGE = "recon.configs"
"""The package that holds ``sites/``, ``prior/`` and ``biasrecon/`` (``package-dir`` in pyproject.toml)."""


def configs_root() -> Path:
    """The folder holding ``sites/``, ``prior/`` and ``biasrecon/``.

    Raises:
        InputError: the package data are missing (a broken install).
    """
    try:
        root = importlib.resources.files(CONFIG_PACKAGE)
    except ModuleNotFoundError:
        raise InputError(
            f"{CONFIG_PACKAGE}: the shipped configs are not installed, expected the package data of "
            f"biasrecon (reinstall with pip install .)."
        ) from None
    return Path(str(root))


def config_path(*parts: str) -> Path:
    """A path below :func:`configs_root`, e.g. ``config_path("sites")`` or ``config_path("biasrecon", "default.yaml")``."""
    return configs_root().joinpath(*parts)
