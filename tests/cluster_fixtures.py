"""Fixtures for tests against the real test cluster (pytest plugin, loaded by conftest).

One cluster (etcd, kube-apiserver, kube-controller-manager) and one node agent per
test session; the controller runs as its own process, as in production, so that
tests can kill and restart it. Without the cluster binaries a test fails in CI and
is skipped on a developer machine with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent_sandbox import crds
from agent_sandbox.kube import Resource
from testcluster.cluster import REPO, TestCluster, free_ports, kube_binaries


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

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: dict[str, str] | None = None):  # fmt: skip
        self.name, self.argv, self.log_path = name, argv, workdir / f"{name}.log"
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the process)
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
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
            "--ca-file",
            str(cluster.ca_file),
        ],
        cluster.workdir,
    ).start()
    agent.root = root  # type: ignore[attr-defined]
    yield agent
    agent.stop()


def controller_process(cluster: TestCluster, name: str = "controller", *args: str) -> Process:
    """A controller process with short leases (tests kill leaders) and a metrics port."""
    webhook_port, metrics_port = free_ports(2)
    argv = [sys.executable, "-m", "agent_sandbox", "run", "--kubeconfig", str(cluster.kubeconfig),
            "--webhook-port", str(webhook_port), "--metrics-port", str(metrics_port),
            "--lease-duration", "3", "--lease-renew", "1", "--log-level", "INFO",
            "--warm-pool-readiness-grace", "20", *args]  # fmt: skip
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


def new_namespace(cluster: TestCluster, prefix: str = "t") -> Iterator[str]:
    """A namespace of its own for one test (a fixture's body), deleted after it."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    status, body = cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert status == 201, body
    yield name
    cluster.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
def namespace(cluster: TestCluster) -> Iterator[str]:
    yield from new_namespace(cluster)


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


RBAC = REPO / "jupyter_config" / "kubernetes" / "rbac.yaml"
_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
_RBAC_PATHS = {
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
}


def apply_rbac(cluster: TestCluster, namespace: str) -> list[str]:
    """The shipped RBAC applied as ``kubectl apply -n namespace`` does; the paths of the
    cluster-wide objects this call created (for the caller to delete)."""
    created = []
    for doc in yaml.safe_load_all(RBAC.read_text()):
        path = _RBAC_PATHS[doc["kind"]].format(ns=namespace)
        for subject in doc.get("subjects") or []:
            subject.setdefault("namespace", namespace)
        status, body = cluster.request("POST", path, doc)
        assert status in (201, 409), body
        if status == 201 and doc["kind"] == "ClusterRole":
            created.append(f"{path}/{doc['metadata']['name']}")
    return created


#: A stand-in for the rules of the Role Zero to JupyterHub's chart gives the Hub's service account
#: ("hub"): what KubeSpawner needs in the Hub's namespace. The shipped RBAC adds the rest.
Z2JH_HUB_RULES = [
    {"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
     "verbs": ["get", "watch", "list", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
]  # fmt: skip


def hub_service_account(cluster: TestCluster, namespace: str, into: Path,
                        lease_namespace: str | None = None) -> Path:  # fmt: skip
    """The Hub's service account "hub" with the chart's Role and the shipped RBAC, as a
    Zero to JupyterHub install with this project's values has it: a kubeconfig with a token
    of that account (and nothing more), written into ``into``. With ``lease_namespace``,
    the account may also hold the controller's lease there (and nothing else there)."""
    apply_rbac(cluster, namespace)
    Client(cluster).create(_ACCOUNTS, namespace, {"metadata": {"name": "hub"}})
    _grant(cluster, namespace, f"hub-{namespace}", namespace, Z2JH_HUB_RULES)
    if lease_namespace:
        leases = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "verbs": ["get", "create", "update"]}]  # fmt: skip
        _grant(cluster, lease_namespace, f"hub-{namespace}", namespace, leases)
    return service_account_kubeconfig(cluster, namespace, "hub", into)


def _grant(cluster: TestCluster, where: str, name: str, account_namespace: str,
           rules: list[dict]) -> None:  # fmt: skip
    """A Role ``name`` in ``where`` with ``rules``, bound to ``account_namespace``'s hub."""
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{where}/"
    binding = {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "hub", "namespace": account_namespace}],
    }
    for kind, body in (("roles", {"metadata": {"name": name}, "rules": rules}),
                       ("rolebindings", binding)):  # fmt: skip
        status, out = cluster.request("POST", rbac + kind, body)
        assert status == 201, out


def service_account_kubeconfig(cluster: TestCluster, namespace: str, account: str,
                               into: Path) -> Path:  # fmt: skip
    """A kubeconfig that authenticates as ``account`` (a TokenRequest's token)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 86400}}  # fmt: skip
    status, out = cluster.request(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", request
    )
    assert status == 201, out
    config = cluster.kubeconfig_dict()
    config["clusters"][0]["cluster"] = {"server": cluster.server,
                                        "certificate-authority": str(cluster.ca_file)}  # fmt: skip
    config["users"][0]["user"] = {"token": out["status"]["token"]}
    path = into / f"kubeconfig-{namespace}-{account}.json"
    path.write_text(json.dumps(config))
    return path
