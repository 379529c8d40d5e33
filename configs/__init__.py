"""The shipped configs (``sites/``, ``prior/``, ``biasrecon/``) as package data: ``recon.configs``.

Installed by ``pyproject.toml`` (``package-dir``); located by :mod:`recon.resources`. No code lives here.
"""
