"""Fixtures for tests against the real test cluster (pytest plugin, loaded by conftest).

One cluster (etcd, kube-apiserver, kube-controller-manager) and one node agent per
test session; the controller runs as its own process, as in production, so that
tests can kill and restart it. Without the cluster binaries a test fails in CI and
is skipped on a developer machine with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_sandbox import crds
from testcluster.cluster import REPO, TestCluster, free_port, kube_binaries


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[TestCluster]:
    try:
        bins = kube_binaries()
    except RuntimeError as exc:
        _unavailable(str(exc))
    tc = TestCluster(tmp_path_factory.mktemp("cluster"), bins)
    try:
        tc.start(crds=crds.all_crds())
    except Exception:
        tc.stop()
        raise
    yield tc
    tc.stop()


class Process:
    """A helper process of the test session (controller, node agent) with its log."""

    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name, self.argv, self.log_path = name, argv, workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the process)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        log.close()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def node_agent(cluster: TestCluster) -> Iterator[Process]:
    root = cluster.workdir / "node"
    root.mkdir(exist_ok=True)
    agent = Process(
        "node-agent",
        [
            sys.executable,
            "-m",
            "testcluster.node_agent",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--root",
            str(root),
        ],
        cluster.workdir,
    ).start()
    agent.root = root  # type: ignore[attr-defined]
    yield agent
    agent.stop()


def controller_process(cluster: TestCluster, name: str = "controller") -> Process:
    """A controller process with short leases (tests kill leaders) and a metrics port."""
    webhook_port, metrics_port = free_port(), free_port()
    argv = [sys.executable, "-m", "agent_sandbox", "run", "--kubeconfig", str(cluster.kubeconfig),
            "--webhook-port", str(webhook_port), "--metrics-port", str(metrics_port),
            "--lease-duration", "3", "--lease-renew", "1", "--log-level", "INFO",
            "--warm-pool-readiness-grace", "20"]  # fmt: skip
    proc = Process(name, argv, cluster.workdir)
    proc.webhook_port, proc.metrics_port = webhook_port, metrics_port  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="session")
def controller(cluster: TestCluster, node_agent: Process) -> Iterator[Process]:
    proc = controller_process(cluster).start()
    wait_for_leader(cluster, proc)
    yield proc
    proc.stop()


def wait_for_leader(cluster: TestCluster, proc: Process, timeout: float = 60) -> None:
    """Wait until ``proc`` leads: the CRDs then call its conversion webhook."""
    deadline = time.monotonic() + timeout
    needle = f":{proc.webhook_port}/"  # type: ignore[attr-defined]
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/sandboxes.agents.x-k8s.io"
    while time.monotonic() < deadline:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"controller exited:\n{proc.log()}")
        status, crd = cluster.request("GET", path)
        config = crd["spec"].get("conversion", {}).get("webhook", {}).get("clientConfig", {})
        if status == 200 and needle in config.get("url", ""):
            return
        time.sleep(0.2)
    raise RuntimeError(f"controller did not become leader:\n{proc.log()}")


@pytest.fixture
def namespace(cluster: TestCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    status, body = cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert status == 201, body
    yield name
    cluster.request("DELETE", f"/api/v1/namespaces/{name}")


class Client:
    """Synchronous JSON access for test code (the code under test uses its own clients)."""

    def __init__(self, cluster: TestCluster):
        self.cluster = cluster

    def create(self, res, ns: str | None, body: dict, expect: int = 201) -> dict:
        body = {"apiVersion": res.api_version, "kind": res.kind, **body}
        status, out = self.cluster.request("POST", res.path(ns), body)
        assert status == expect, (status, out)
        return out

    def get(self, res, ns: str | None, name: str) -> dict | None:
        status, out = self.cluster.request("GET", res.path(ns, name))
        if status == 404:
            return None
        assert status == 200, (status, out)
        return out

    def list(self, res, ns: str | None, labels: str | None = None) -> list[dict]:
        from urllib.parse import quote

        query = f"?labelSelector={quote(labels)}" if labels else ""
        status, out = self.cluster.request("GET", res.path(ns) + query)
        assert status == 200, (status, out)
        return out["items"]

    def patch(self, res, ns: str | None, name: str, patch: dict, sub: str = "") -> dict:
        status, out = self.cluster.request(
            "PATCH", res.path(ns, name, sub), patch, content_type="application/merge-patch+json"
        )
        assert status == 200, (status, out)
        return out

    def delete(self, res, ns: str | None, name: str) -> int:
        return self.cluster.request("DELETE", res.path(ns, name))[0]


def wait_for(predicate, timeout: float = 60, what: str = "condition", step: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; that value, or an AssertionError."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def condition(obj: dict | None, type_: str) -> dict:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return {}


def wait_condition(k8s: Client, res, ns: str, name: str, type_: str, *, status: str = "True",
                   reason: str | None = None, timeout: float = 60) -> dict:  # fmt: skip
    """Wait until ``name`` has condition ``type_`` with ``status`` (or ``reason``); the object."""

    def check():
        obj = k8s.get(res, ns, name)
        cond = condition(obj, type_)
        ok = cond.get("reason") == reason if reason else cond.get("status") == status
        return obj if ok else None

    return wait_for(check, timeout, f"{name} {type_}={reason or status}")


@pytest.fixture(scope="session")
def k8s(cluster: TestCluster) -> Client:
    return Client(cluster)
