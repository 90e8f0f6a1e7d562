"""etcd + kube-apiserver + kube-controller-manager 1.20, for tests and benchmarks.

Start order (the garbage collector discovers resources only every 30 s, so the
CRDs go in before the controller-manager starts): etcd, apiserver, kubeconfig,
CRDs, controller-manager.

Two shapes. For the stand-in node (``testcluster.node_agent``) everything listens on
127.0.0.1 and the service range is bookkeeping: nothing connects to a ClusterIP. For a
real node (:mod:`testcluster.realnode`, ``for_real_node``) the API server listens on the
host's end of the node's link, as the node's kubelet and pods must reach it; the
cluster then runs what a kubelet relies on and the stand-in does without: the
kube-scheduler, the ServiceAccount admission plugin with its token controller,
Endpoints for Services, and the binding of PersistentVolumes to claims.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now.

    The sockets are held open together until all are chosen: ports picked one at a
    time can repeat (the kernel may hand out the same port to the next ``bind`` once
    the first socket is closed), which once gave a Hub's own port and its proxy's API
    the same number.
    """
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def kube_binaries() -> Path:
    """The directory with kube-apiserver and kube-controller-manager (built once, cached)."""
    out = subprocess.run(
        [str(REPO / "scripts" / "build-test-cluster")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot get the test cluster binaries:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


class TestCluster:
    """A throwaway cluster in ``workdir``; ``start()``, then ``kubeconfig``, then ``stop()``."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None, *,
                 address: str = "127.0.0.1", service_range: str = "10.0.0.0/24",
                 for_real_node: bool = False):  # fmt: skip
        self.workdir = workdir
        self.bin_dir = bin_dir or kube_binaries()
        self.token = uuid.uuid4().hex
        self.address, self.service_range, self.for_real_node = address, service_range, for_real_node
        #: Bearer tokens of other identities: name -> (token, groups), for a node's kubelet.
        self.identities: dict[str, tuple[str, str]] = {}
        # The API server's and etcd's (client, peer) ports, distinct: see free_ports.
        self.port, *self._etcd_ports = free_ports(3)
        self.server = f"https://{address}:{self.port}"
        self.kubeconfig = workdir / "kubeconfig"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- processes --------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
        self._procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start(self, crds: list[dict[str, Any]] | None = None, audit: bool = False) -> TestCluster:
        """Start etcd, the API server and the controller manager. ``audit``: the API server
        logs every write (not reads) to :attr:`audit_log`, one JSON event per line."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        audit_flags = []
        if audit:
            policy = self.workdir / "audit-policy.json"
            policy.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                "omitStages": ["RequestReceived"], "rules": [
                    {"level": "None", "verbs": ["get", "list", "watch"]},
                    {"level": "Metadata"}]}))  # fmt: skip
            audit_flags = [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                           "--audit-log-format=json"]  # fmt: skip
        etcd_port, peer_port = self._etcd_ports
        if self.for_real_node:
            # logs and exec reach the kubelet at the node's address (its name resolves
            # nowhere); pods get their service account's token, as on any cluster.
            real_node_flags = ["--kubelet-preferred-address-types=InternalIP,Hostname"]
        else:
            real_node_flags = ["--disable-admission-plugins=ServiceAccount"]
        self._spawn(
            "etcd",
            [
                "etcd",
                "--name",
                "default",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
            ],
        )
        key, pub = self.workdir / "sa.key", self.workdir / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
            check=True,
            capture_output=True,
        )
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,{uuid.uuid4()},"system:masters"\n' + "".join(
            f'{token},{name},{uuid.uuid4()},"{groups}"\n'
            for name, (token, groups) in self.identities.items()))
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.port}",
                f"--cert-dir={self.ca_file.parent}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pub}",
                f"--service-account-signing-key-file={key}",
                f"--service-cluster-ip-range={self.service_range}",
                *real_node_flags,
                *audit_flags,
            ],
        )
        self._wait_ready()
        self.kubeconfig.write_text(json.dumps(self.kubeconfig_dict(), indent=1))
        # The runtime classes the node agent knows: pods may ask for gVisor by name.
        for name, handler in (("gvisor", "runsc"), ("kata-qemu-nvidia-gpu", "kata")):
            self.request(
                "POST",
                "/apis/node.k8s.io/v1/runtimeclasses",
                {
                    "apiVersion": "node.k8s.io/v1",
                    "kind": "RuntimeClass",
                    "metadata": {"name": name},
                    "handler": handler,
                },
            )
        if crds:
            for crd in crds:
                self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            for crd in crds:
                self._wait_established(crd["metadata"]["name"])
        controllers = "garbagecollector,namespace,serviceaccount,pvc-protection"
        real_node_flags = []
        if self.for_real_node:
            # nodelifecycle lifts the not-ready taint a new node's kubelet is registered with.
            controllers += (",serviceaccount-token,endpoint,endpointslice,persistentvolume-binder,"
                            "pv-protection,nodelifecycle")  # fmt: skip
            real_node_flags = [f"--service-account-private-key-file={key}",
                               f"--root-ca-file={self.ca_file}"]  # fmt: skip
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--controllers={controllers}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                *real_node_flags,
            ],
        )
        if self.for_real_node:
            self._spawn("kube-scheduler", [
                str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false", "--port=0", "--secure-port=0"])  # fmt: skip
        return self

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)

    # -- the API ----------------------------------------------------------------------------
    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    @property
    def ca_file(self) -> Path:
        """The API server's self-signed serving certificate; the file holds its CA too."""
        return self.workdir / "certs" / "apiserver.crt"

    def kubeconfig_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "insecure-skip-tls-verify": True},
                }
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        """A plain HTTPS call to the API server (for setup; code under test uses its clients)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw.strip().startswith(b"{") else raw
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw.strip().startswith(b"{") else raw

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready:\n{self.log('kube-apiserver')}")

    def _wait_established(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, crd = self.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            conditions = (crd.get("status") or {}).get("conditions", []) if status == 200 else []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return
            time.sleep(0.1)
        raise RuntimeError(f"CRD {name} not established")
