"""notebooks/quickstart.ipynb runs top to bottom (in a temporary working folder, so the
repository gets no outputs), and is committed without outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow  # ~40 s: 20 training steps of the tiny model and four 25-step samples on CPU
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile folder: the notebook writes there
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "run"
    work.mkdir()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "method=coft, control=canny" in text
    assert "samples: [(64, 64), (64, 64)]" in text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) == 4  # a training item, the loss curve, then condition | samples | ground truth twice:
    # the 20-step adapter and the shipped one (assets/adapters/canny_coft)
    assert list(tmp_path.glob("orthodiff-quickstart-*/adapter.safetensors"))  # written to the temp folder
