"""The real node itself (testcluster/realnode.py): what the project's suites rely on.

Node: the real one (kubelet, containerd, runc, gVisor), since these are the facts the
stand-in only imitates: pods with their own network stack and address, gVisor chosen by
RuntimeClass, Services through kube-proxy, logs through the kubelet, restarts and
deletion. The last test starts a second node beside the session's and checks that it
leaves the machine as it found it.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

from cluster_fixtures import Client, wait_for

from agent_sandbox.kube import PODS, SERVICES
from testcluster import realnode

#: The pod's program: says which kernel it runs on, then serves HTTP on its own address.
SERVE = textwrap.dedent("""
    import http.server, os, platform, sys
    print("kernel", platform.release(), flush=True)
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
            self.wfile.write(os.environ["HOSTNAME"].encode())
    http.server.HTTPServer((os.environ["POD_IP"], 8080), Hello).serve_forever()
""")


def pod(name: str, runtime_class: str | None = None, script: str = SERVE, **spec) -> dict:
    container = {
        "name": "main", "image": "jupyter-sandbox-kernel:latest",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-c", script],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
    }  # fmt: skip
    body = {"metadata": {"name": name, "labels": {"app": name}}, "spec": {
        "containers": [container], "terminationGracePeriodSeconds": 5, **spec}}  # fmt: skip
    if runtime_class:
        body["spec"]["runtimeClassName"] = runtime_class
    return body


def running(k8s, ns: str, name: str, timeout: float = 90) -> dict:
    def check():
        obj = k8s.get(PODS, ns, name)
        return obj if obj and obj["status"].get("phase") == "Running" and obj["status"].get(
            "podIP") else None

    return wait_for(check, timeout, f"pod {name} Running")


def log_of(cluster, ns: str, name: str, previous: bool = False) -> str:
    query = "?previous=true" if previous else ""
    status, body = cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}/log{query}")
    assert status == 200, body
    return body.decode() if isinstance(body, bytes) else json.dumps(body)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_runc_and_gvisor_pods_with_their_own_addresses(real, real_k8s, real_namespace):
    k8s, ns, cluster = real_k8s, real_namespace, real.cluster
    k8s.create(PODS, ns, pod("plain"))
    k8s.create(PODS, ns, pod("sandboxed", "gvisor"))
    plain, sandboxed = running(k8s, ns, "plain"), running(k8s, ns, "sandboxed")
    # gVisor's kernel answers in the sandboxed pod; the host's in the other.
    wait_for(lambda: "kernel" in log_of(cluster, ns, "sandboxed"), 30, "the pod's first line")
    assert log_of(cluster, ns, "sandboxed").split()[1] == "4.4.0"
    assert log_of(cluster, ns, "plain").split()[1] == os.uname().release
    # Each pod has its own address in the node's pod range, reached from the host.
    ips = {plain["status"]["podIP"], sandboxed["status"]["podIP"]}
    assert len(ips) == 2 and all(ip.startswith("10.244.") for ip in ips)
    for obj in (plain, sandboxed):
        answer = wait_for(lambda o=obj: _try_get(f"http://{o['status']['podIP']}:8080/"), 30,
                          "the pod's server")  # fmt: skip
        assert answer == obj["metadata"]["name"]
    # A Service's ClusterIP reaches the gVisor pod through kube-proxy.
    ports = [{"port": 80, "targetPort": 8080}]
    svc = k8s.create(SERVICES, ns, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "sandboxed"}, "ports": ports}})  # fmt: skip
    ip = svc["spec"]["clusterIP"]
    assert wait_for(lambda: _try_get(f"http://{ip}/"), 30, "the Service") == "sandboxed"


def _try_get(url: str) -> str | None:
    try:
        return http_get(url)
    except OSError:
        return None


def test_gvisor_pod_has_its_own_network_stack_and_checkpoints(real, real_k8s, real_namespace,
                                                              tmp_path):  # fmt: skip
    """runsc 20240729 takes every pod's namespace for the host's on recent kernels and
    refuses to run with its own stack there; the node's shim hides that from it. A
    netstack sandbox can be checkpointed (hostinet cannot)."""
    k8s, ns, node = real_k8s, real_namespace, real.node
    k8s.create(PODS, ns, pod("idle", "gvisor", script="import time; time.sleep(3600)"))
    obj = running(k8s, ns, "idle")
    container_id = obj["status"]["containerStatuses"][0]["containerID"].split("://")[1]
    image = tmp_path / "image"
    out = node.runsc("checkpoint", "--leave-running", f"--image-path={image}", container_id)
    assert (image / "checkpoint.img").exists(), out
    assert k8s.get(PODS, ns, "idle")["status"]["phase"] == "Running"


def test_restarts_exit_codes_and_deletion(real, real_k8s, real_namespace):
    k8s, ns, cluster = real_k8s, real_namespace, real.cluster
    script = "import sys, time; print('up', flush=True); time.sleep(1); sys.exit(7)"
    for name, runtime in (("crash-runc", None), ("crash-gvisor", "gvisor")):
        k8s.create(PODS, ns, pod(name, runtime, script=script))
    for name in ("crash-runc", "crash-gvisor"):
        def restarted(name=name):
            obj = k8s.get(PODS, ns, name)
            statuses = obj["status"].get("containerStatuses") or [{}]
            last = statuses[0].get("lastState", {}).get("terminated")
            return statuses[0] if statuses[0].get("restartCount", 0) >= 1 and last else None

        status = wait_for(restarted, 90, f"{name} to restart")
        assert status["lastState"]["terminated"]["exitCode"] == 7, status
        assert "up" in log_of(cluster, ns, name, previous=True)
    # Deletion ends the pods within their grace period, gVisor's too.
    started = time.monotonic()
    for name in ("crash-runc", "crash-gvisor"):
        k8s.delete(PODS, ns, name)
    for name in ("crash-runc", "crash-gvisor"):
        wait_for(lambda name=name: k8s.get(PODS, ns, name) is None, 60, f"{name} to go")
    assert time.monotonic() - started < 60


def test_a_second_node_leaves_the_machine_as_it_found_it(real, tmp_path):
    """Another node beside the session's, with pods of both runtimes, stopped: nothing of
    it remains, and the session's node runs on."""
    before = machine_state()
    with realnode.running(tmp_path, real.node.bin_dir) as (cluster, node):
        assert node.slot.index != real.node.slot.index
        k8s = Client(cluster)
        for name, runtime in (("a", None), ("b", "gvisor")):
            k8s.create(PODS, "default", pod(name, runtime))
        for name in ("a", "b"):
            running(k8s, "default", name)
        during = machine_state()
        assert during["links"] != before["links"]  # it did change the machine, but only so
        assert {k: during[k] for k in ("sysctls", "nft", "mounts", "paths")} == {
            k: before[k] for k in ("sysctls", "nft", "mounts", "paths")}
    after = machine_state()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert realnode.leftovers() == []
    # The session's node runs on: a new pod starts there.
    session = Client(real.cluster)
    session.create(PODS, "default", pod("after-the-other", "gvisor"))
    running(session, "default", "after-the-other")
    session.delete(PODS, "default", "after-the-other")


def machine_state() -> dict:
    """What a node may change on the host, seen from the host."""
    def sh(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/jsnode*"))
    return {
        "sysctls": {n: realnode.sysctl(n) for n in (*realnode.KUBELET_SYSCTLS,
                    "net.ipv4.ip_forward", "net.ipv4.conf.all.route_localnet")},
        "links": sorted(line.split()[0] for line in sh("ip", "-br", "link").splitlines()),
        "routes": sh("ip", "route"),
        "nft": sh("nft", "list", "ruleset"),
        "mounts": sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                         .splitlines()),
        "cgroups": cgroups,
        # Where the kubelet and containerd write whatever they are told: never the host's.
        "paths": [p for p in ("/var/log/pods", "/var/log/containers", "/var/lib/kubelet",
                              "/var/lib/cni", "/run/containerd") if os.path.lexists(p)],
    }  # fmt: skip


def test_an_orphaned_node_is_swept_and_a_reused_pid_is_spared(tmp_path):
    """A node whose test process died (its slot's lock gone, its record left) is cleaned
    up by the next node to start; a process that got the recorded holder's pid since
    (here one in namespaces of its own, as a sandbox or another node's containerd is) is
    not taken for the node's."""
    if os.geteuid() != 0:
        import pytest

        pytest.skip("the real node needs root")
    orphan = realnode.RealNode(tmp_path / "orphan", Path("/nonexistent"), tmp_path)
    slot = orphan.network_up()
    holder = orphan.holder
    slot.release()  # its test process is gone: no lock, a record, a link, a holder
    assert Path(f"/sys/class/net/{slot.iface}").exists()
    realnode.sweep_orphans()
    assert not Path(f"/sys/class/net/{slot.iface}").exists() and not slot.record.exists()
    assert holder.wait(timeout=10) is not None
    # A stranger in namespaces of its own, under a recorded holder's pid with another
    # start time: the sweep leaves it alone.
    stranger = subprocess.Popen(["unshare", "--net", "--mount", "sleep", "60"])
    try:
        time.sleep(0.3)
        record = {"holder": stranger.pid, "started": 1, "workdir": str(tmp_path / "gone"),
                  "iface": "jsnode-none", "cgroup": "jsnode-none"}  # fmt: skip
        path = realnode.RECORDS / "realnode-31.json"
        path.write_text(json.dumps(record))
        realnode.sweep_orphans()
        assert not path.exists() and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
