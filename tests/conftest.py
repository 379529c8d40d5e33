"""Fixtures and the one script loader shared by every test folder.

pytest (``--import-mode=importlib``, setup.cfg) registers this file as the module ``tests.conftest``;
test files take the loader with ``from tests.conftest import load_script``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str, module_name: str | None = None) -> ModuleType:
    """A script of the repository (``"scripts/adapt.py"``, ``"studies/lambda_step.py"``) loaded as a module.

    Each call executes the file afresh. The module is registered in ``sys.modules`` under
    ``module_name`` (default ``<stem>_script``) before it runs, because dataclasses look their module up.
    """
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(module_name or f"{file.stem}_script", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def single_thread():
    """Tiny networks run fastest on one thread; two threads on a loaded 2-core machine stall (spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
