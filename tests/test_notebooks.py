"""The notebooks: committed without outputs, and executed end to end with the venv's kernel.

Each notebook holds ``assert`` cells on real properties (identity at γ = 0, the profile round trip,
the project's metrics equal to ``fastmri.evaluate``'s, BiasRecon's guard), so running it is a test.
They run on a copy in a temporary folder, so nothing is written into the repository; the
fastMRI notebook's ``DATA_ROOT`` names a folder that does not exist, so it uses its simulated stand-in.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_fastmri_subset.ipynb", "03_adapter_in_your_codebase.ipynb")
CELL_TIMEOUT_S = 300  # one cell; the three notebooks take about a minute each on a loaded 2-core CPU
KERNEL_PROBE = "import sys\nprint(sys.prefix)"


def test_the_notebooks_are_the_expected_ones():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for index, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {index} has stored outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"
    assert any("assert " in cell.source for cell in code), f"{name} checks nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
    """Run a copy in a temporary folder; every cell (asserts included) must pass, with the venv's python."""
    # no fastMRI folder (not even the notebook's default path): the fastMRI notebook simulates its stand-in
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "no-fastmri-folder"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    source = NOTEBOOK_DIR / name
    committed = source.read_bytes()
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(source, workdir / name)
    nb = nbformat.read(workdir / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_PROBE))

    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{name}: executed in {seconds:.1f} s")

    probe = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.output_type == "stream")
    assert Path(probe.strip()).resolve() == Path(sys.prefix).resolve(), \
        f"{name} ran in {probe.strip()!r}, expected the test's environment {sys.prefix}"
    assert source.read_bytes() == committed
    assert [p.name for p in workdir.iterdir()] == [name], "a notebook wrote into its working folder"
    warnings = [out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                if out.output_type == "stream" and out.get("name") == "stderr"]
    assert not [w for w in warnings if "IProgress" in w or "Warning" in w], f"{name} printed warnings: {warnings}"
