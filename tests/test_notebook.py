"""examples/quickstart.ipynb runs end to end on the tiny local model (DELIA_NOTEBOOK_TINY=1), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    notebook = nbformat.read(Path(__file__).parents[1] / "examples" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("DELIA_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "--- follow the <sep> format" in text and "--- DO NOT follow the <sep> format" in text
    assert "'downstream'" in text and "'diverse'" in text
    assert (tmp_path / "quickstart" / "loss.png").exists() and (tmp_path / "quickstart" / "cache.jsonl").exists()
