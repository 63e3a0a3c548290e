"""notebooks/inspect_run.ipynb runs top to bottom on a tiny run and draws its figures."""
import pathlib

import ml_collections
import nbformat
import pytest

from tests.helpers import tiny_config
from xsample_jax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_run.ipynb"


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert 'WORKDIR = os.environ.get("XSAMPLE_WORKDIR", "runs/smoke")' in code[0].source


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_run(tmp_path, monkeypatch):
  import nbclient
  probe = ml_collections.ConfigDict({"linear_probe": {"train_examples": 64, "eval_examples": 64}})
  out = train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_every_steps=3, evals=probe), str(tmp_path))
  assert "eval/linear_probe/top1" in out
  # The kernel inherits this environment: the workdir, and conftest's 8 fake CPU devices (any count works: the
  # saved config's mesh.data = -1 takes all devices there are).
  monkeypatch.setenv("XSAMPLE_WORKDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on a cell's error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # training curves, graph vs learned, neighbour grid, two projections
  assert len(images) >= 5, [o.get("data", {}).keys() for o in outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "eval/linear_probe/top1" in text and "step 3:" in text
