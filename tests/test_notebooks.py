"""The notebooks run top to bottom on a results directory named by EQNTK_RESULTS.

The directory is conftest's synthetic one (``make_results``), analysed beforehand with the
closed-form kernels (the notebooks read the tables and theory caches ``eqntk analyze`` leaves).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from eqntk import pipeline

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def results(tmp_path_factory, make_results, closed_form_kernel_fn) -> Path:
    out = make_results(tmp_path_factory.mktemp("notebooks") / "run")
    pipeline.analyze(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)
    return out


def test_notebooks_exist_and_are_committed_without_outputs():
    assert len(NOTEBOOKS) >= 1
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
        assert "EQNTK_RESULTS" in nb.cells[1].source  # the first code cell sets the directory


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, results, monkeypatch, tmp_path):
    monkeypatch.setenv("EQNTK_RESULTS", str(results))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel then draws inline, as in Jupyter
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no plot"
