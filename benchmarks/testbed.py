"""The test cluster with a node and this project's controller, for benchmarks.

    async with running_cluster(workdir, real_node=False) as (cluster, kube):
        ...

Starts etcd, kube-apiserver and kube-controller-manager (``testcluster``), a node
(the stand-in node agent, or with ``real_node`` the real one: kubelet, containerd,
gVisor, ``testcluster.realnode``) and the controller as separate processes, as in
production;
their logs go to ``workdir``: ``$BENCH_DIR`` if set (kept), else a temporary
directory. ``BENCH_LOG=DEBUG`` raises the controller's log level.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent_sandbox import crds  # noqa: E402
from agent_sandbox.kube import Kube  # noqa: E402
from testcluster import realnode  # noqa: E402
from testcluster.cluster import TestCluster, free_port, kube_binaries  # noqa: E402


@contextlib.asynccontextmanager
async def running_cluster(
    workdir: Path, audit: bool = False, real_node: bool = False
) -> AsyncIterator[tuple[TestCluster, Kube]]:
    with contextlib.ExitStack() as stack:
        if real_node:
            cluster, _ = stack.enter_context(realnode.running(
                workdir, kube_binaries(), crds=crds.all_crds(), audit=audit))  # fmt: skip
        else:
            cluster = TestCluster(workdir).start(crds=crds.all_crds(), audit=audit)
            stack.callback(cluster.stop)
        async with _helpers(workdir, cluster, real_node) as kube:
            yield cluster, kube


@contextlib.asynccontextmanager
async def _helpers(workdir: Path, cluster: TestCluster, real_node: bool) -> AsyncIterator[Kube]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kubeconfig = str(cluster.kubeconfig)
    helpers = {
        "node-agent": ["-m", "testcluster.node_agent", "--kubeconfig", kubeconfig,
                       "--root", str(workdir / "node")],
        "controller": ["-m", "agent_sandbox", "run", "--kubeconfig", kubeconfig,
                       "--webhook-port", str(free_port()),
                       "--log-level", os.environ.get("BENCH_LOG", "WARNING")],
    }  # fmt: skip
    if real_node:
        del helpers["node-agent"]
    procs = []
    try:
        for name, argv in helpers.items():
            with open(workdir / f"{name}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=REPO,
                    )
                )
        kube = await Kube.connect(kubeconfig)
        try:
            yield kube
        finally:
            await kube.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_in_workdir(run: Callable[[Path], Coroutine[Any, Any, int]]) -> int:
    """``asyncio.run(run(workdir))`` in ``$BENCH_DIR`` (kept) or a temporary directory."""
    if os.environ.get("BENCH_DIR"):
        return asyncio.run(run(Path(os.environ["BENCH_DIR"])))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        return asyncio.run(run(Path(tmp)))
