"""The one error type for bad user input.

Every check of user-supplied data (files, keys, shapes, values, configs) raises
:class:`InputError` with one sentence naming the file, the key and what was expected.
Scripts catch it, print the message and exit with code 2, writing nothing.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input given by the user: one sentence saying what, where and what was expected."""
