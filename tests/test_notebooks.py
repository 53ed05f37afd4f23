"""The notebooks in notebooks/ run top to bottom without an error, and are committed executed.

Each notebook is run the way a reader runs it: a fresh python3 kernel, the notebook's folder as
the working directory, every cell in order. The assert statements inside the notebooks check the
properties their text claims, so a change to svd_lora.py or panacea.py that breaks one of those
properties fails here. Notebooks added to notebooks/ later are picked up by the glob.
"""
import glob
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
# seconds; a notebook takes 3-10 s on 2 CPU cores, results.ipynb about 40 s when it trains a tiny run
CELL_TIMEOUT = 120
MAX_BYTES = 300_000  # outputs are committed: keep the PNGs small


class ThisPython(KernelSpecManager):
    """Every kernel name resolves to this interpreter, whatever kernel.json files are installed:
    inside a virtualenv (CI's) the kernel must import the packages pytest sees."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="Python 3", language="python")


def execute(path, timeout=CELL_TIMEOUT):
    """Run the notebook at `path` top to bottom in a fresh kernel; returns it with its outputs.
    A cell that raises makes nbclient raise CellExecutionError."""
    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())
    client = NotebookClient(nb, km=km, timeout=timeout, startup_timeout=120, record_timing=False,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
    client.execute()
    return nb


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_without_error(path):
    nb = execute(path)
    assert any(c.outputs for c in code_cells(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_with_its_outputs(path):
    """Readers look at the notebooks on GitHub: they must be saved after a clean run."""
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert cells, "a notebook with no code"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        "save the notebook after one run from a fresh kernel, every cell in order"
    assert any(c.outputs for c in cells), "saved without outputs"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"saved with an error: {errors[0].get('ename')}"
    assert os.path.getsize(path) < MAX_BYTES, "too large: lower the figure dpi or the number of plots"
