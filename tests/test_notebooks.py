"""The example notebooks run top to bottom in a real Jupyter kernel, offline, and are stored
without outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.slow


def test_the_three_notebooks_exist() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_subprocess_eval_in_notebook.ipynb",
        "03_logging_under_faults.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}  # the kernel's working directory
    client = NotebookClient(notebook, timeout=180, kernel_name="python3", resources=resources)
    start = time.monotonic()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    elapsed = time.monotonic() - start
    assert elapsed < 120  # each notebook is meant to run in well under a minute here
    if path.name.startswith("01_"):  # the timeline picture was shown inline
        assert any("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))
