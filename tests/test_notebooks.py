"""nbclient runs every example notebook with the sandboxed kernel."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import POOLED, runtime_name
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager
from sandbox_provisioner.pool import close_pools

EXAMPLES = Path(__file__).parent.parent / "examples" / "notebooks"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    return [o for cell in nb.cells for o in cell.get("outputs", []) if o["output_type"] == kind]


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o["text"] for o in outputs(nb, "stream") if o["name"] == "stdout")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
async def test_example_notebook_runs_sandboxed(runtime: str, path: Path, tmp_path: Path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(path, workdir)
    nb = nbformat.read(path, as_version=4)
    ksm = RuntimeKernelSpecManager()
    if runtime.endswith(POOLED):
        ksm.overrides = {
            f"sandboxed-{runtime_name(runtime)}": {"pool_size": 1, "pool_root": str(tmp_path)}
        }
    else:  # cold: no gVisor template built on the side
        ksm.overrides = {f"sandboxed-{runtime}": {"snapshot_templates": False}}
    km = AsyncKernelManager(kernel_name=f"sandboxed-{runtime_name(runtime)}",
                            kernel_spec_manager=ksm)  # fmt: skip
    client = NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(workdir)}})
    try:
        await client.async_execute()  # raises CellExecutionError on any error output
    finally:
        if km.has_kernel:  # nbclient ends only a kernel manager it made itself
            await km.shutdown_kernel(now=True)
        await close_pools()

    assert f"sandbox runtime: {runtime_name(runtime)}" in stdout(nb) or path.stem != "data-analysis"
    if path.stem == "data-analysis":
        assert any("image/png" in o["data"] for o in outputs(nb, "display_data"))
        assert any("text/html" in o["data"] for o in outputs(nb, "execute_result"))
        assert "heights.csv" not in [p.name for p in workdir.iterdir()]
    if path.stem == "what-the-sandbox-blocks":
        text = stdout(nb)
        assert "ALLOWED" not in text, text
        assert text.count("BLOCKED") >= 10, text
