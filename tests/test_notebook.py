"""notebooks/quickstart.ipynb runs top to bottom on this interpreter, against the in-process emulator.

The notebook is executed with nbclient in a fresh ipykernel whose working directory is notebooks/, as a
user opening it in Jupyter would have it. Cells are found by their ids, which the notebook fixes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_saved_without_outputs() -> None:
    # Outputs hold run ids, ports and timings: saved, they would make every diff noisy.
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["id"]


def _text(cell: Any) -> str:
    """Everything a code cell showed, as plain text."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip(
        "nbclient", reason="nbclient is not installed (pip install -e '.[test]' brings it)"
    )
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec

    # A "python3" kernel spec that launches this very interpreter (and so this venv's enrich), placed
    # first on the kernel search path so a user-wide "python3" spec cannot point somewhere else.
    write_kernel_spec(tmp_path / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)", id="test-interpreter"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=60,
        startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails

    cells = {cell.id: cell for cell in nb.cells}
    errors = [c.id for c in nb.cells if any(o.output_type == "error" for o in c.get("outputs", []))]
    assert errors == []
    assert _text(cells["test-interpreter"]).strip() == sys.executable

    assert "SYNTHETIC" in _text(cells["emulator"])
    assert "(51, 3)" in _text(cells["load"])
    schema = _text(cells["schema"])
    assert "('founded', Int64)" in schema and "('products', List(String))" in schema
    assert "completed" in _text(cells["status"])
    assert "pending" in _text(cells["interrupt"])
    resume = _text(cells["resume"])
    assert "pending" not in resume and "completed" in resume
    assert ": 0 new" in resume and "same run ids: True" in resume
    assert "headquarters" in _text(cells["jsonschema"])
    pandas_out = _text(cells["pandas"])
    assert pandas_out.startswith("DataFrame") and "Int64" in pandas_out
    assert "█" in _text(cells["chart"])
