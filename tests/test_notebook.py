"""Execute notebooks/walkthrough.ipynb headless in quick mode and check its size table."""

import json
import os

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPOSITORY, "notebooks", "walkthrough.ipynb")
SIZE_TABLE_HEADER = "| variant | kind | bytes | gzip bytes |"


def _cell_text(cell):
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            text = output["text"]
            parts.append(text if isinstance(text, str) else "".join(text))
        elif "data" in output:
            text = output["data"].get("text/plain", "")
            parts.append(text if isinstance(text, str) else "".join(text))
    return "".join(parts)


def test_committed_notebook_has_outputs():
    with open(NOTEBOOK, encoding="utf-8") as f:
        notebook = json.load(f)
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] for cell in code_cells)
    assert not [output for cell in code_cells for output in cell["outputs"]
                if output["output_type"] == "error"]
    assert SIZE_TABLE_HEADER in _cell_text(code_cells[-1])


@pytest.mark.slow
def test_walkthrough_runs_quick(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="install the notebooks extra: "
                                   "pip install nbformat nbclient ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="install the notebooks extra: "
                                   "pip install nbformat nbclient ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 Jupyter kernel; install one with "
                    "`pip install ipykernel && python -m ipykernel install --user`")

    monkeypatch.setenv("TFCOMPRESS_QUICK", "1")
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "QUICK=True" in _cell_text(code_cells[0])
    table = _cell_text(code_cells[-1])
    assert SIZE_TABLE_HEADER in table
    for variant in ("baseline float32 SavedModel", "baseline float32", "baseline dynamic"):
        assert f"| {variant} |" in table
    # A barely trained int8 model can miss the cosine tolerance, and the notebook then
    # reports it as not written instead of adding a row.
    exports = _cell_text(code_cells[-2])
    assert "| compressed int8 |" in table or "compressed int8: not written" in exports
