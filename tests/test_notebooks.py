"""The Colab notebooks: committed without outputs, and each runs top to bottom (nbclient).

The kernel is this interpreter (`sys.executable -m ipykernel_launcher`) through a kernelspec
written to a temporary folder, so the test does not depend on which kernels the machine has
registered. Notebooks run with NOTEBOOK_SMOKE=1 (tiniest settings) in a temporary directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("tavr_quickstart.ipynb", "perfusion_quickstart.ipynb", "latency.ipynb")
KERNEL = "cardiac-jax-test"


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Makes kernel managers whose kernel is this venv's Python, whatever is registered."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL
    spec_dir.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )

    def make() -> KernelManager:
        specs = KernelSpecManager(kernel_dirs=[str(kernels)])
        return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)

    return make


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory):
    """One output folder for all notebooks, so they share the on-disk compilation cache."""
    return tmp_path_factory.mktemp("notebook_work")


def _kernel_env(workdir: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device, as on a Colab CPU runtime (conftest forces 4 for the sharding tests).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env.update(
        XLA_FLAGS=" ".join(flags),
        NOTEBOOK_SMOKE="1",
        NOTEBOOK_WORKDIR=str(workdir),
    )
    env.pop("CARDIAC_JAX_REPO", None)
    env.pop("MPLBACKEND", None)  # ipykernel then picks the inline backend: figures are outputs
    return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert cell.outputs == [], f"{name}: cell {cell.id} has outputs"
        assert cell.execution_count is None, f"{name}: cell {cell.id} has an execution count"
    # The first code cell is the Colab install cell.
    assert "google.colab" in code[0].source and "REPO_URL" in code[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, kernel_manager_factory, notebook_workdir):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        timeout=600,  # per cell
        startup_timeout=180,  # a kernel starts slowly on a busy 2-core machine
        km=kernel_manager_factory(),
        resources={"metadata": {"path": str(run_dir)}},
    )
    # Any cell error raises CellExecutionError with the cell and its traceback.
    client.execute(env=_kernel_env(notebook_workdir))
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    # Every notebook shows at least one figure.
    assert any(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    ), f"{name} produced no figure"
    # Outputs went to the notebook's own folder under NOTEBOOK_WORKDIR, none to the working dir.
    assert (notebook_workdir / name.split("_")[0].removesuffix(".ipynb")).is_dir()
    assert not (run_dir / "cardiac_jax_work").exists()
