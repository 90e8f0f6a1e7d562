"""The jupyter_server extension, in a real server: pools end with it, orphaned claims go."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_fixtures import wait_for
from test_pool_controller import make_pool, make_template
from test_server import CONFIG

from agent_sandbox import api
from agent_sandbox.kube import CLAIMS
from sandbox_provisioner.limits import CGROUP_PARENT, CGROUP_ROOT, cgroups_available
from sandbox_provisioner.runtimes.process import descendants, is_running, process_start_time
from testcluster.cluster import free_port


def start_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", f"--config={CONFIG}", "--no-browser",
             f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
             "--IdentityProvider.token=t", f"--ServerApp.root_dir={root}", "--allow-root"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )  # fmt: skip
    return proc, port, log


def api_call(port: int, method: str, path: str, body: object = None) -> object:
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "token t", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        data = response.read()
    return json.loads(data) if data else None


def wait_up(proc: subprocess.Popen, port: int, log: Path) -> None:
    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            api_call(port, "GET", "/api/status")
            return True
        except OSError:
            return False

    wait_for(up, 60, "the server", step=0.2)


def test_pools_end_with_the_server(tmp_path: Path):
    from conftest import require_runtime

    require_runtime("bubblewrap")
    proc, port, log = start_server(tmp_path, {})
    try:
        wait_up(proc, port, log)
        kernel = api_call(port, "POST", "/api/kernels",
                          {"name": "sandboxed-python-bubblewrap", "path": ""})  # fmt: skip
        assert kernel["id"]
        running = wait_for(lambda: _pool_members(proc.pid), 60, "a pooled sandbox")
        members = {pid: process_start_time(pid) for pid in running}
        assert all(members.values())
        # What only a clean stop removes: the members' cgroups (processes would die anyway).
        groups = []
        if cgroups_available():  # as root; else the sandboxes have rlimits
            slots = {
                m.group(0)
                for pid in running
                for m in re.finditer(rb"m-[0-9a-f]{12}", Path(f"/proc/{pid}/cmdline").read_bytes())
            }
            groups = [
                g
                for slot in slots
                for g in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}/pool-{slot.decode()}")
            ]
            assert groups, slots  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not [p for p, t in members.items() if is_running(p, t)]
    assert not [g for g in groups if g.exists()]


def _pool_members(server: int) -> list[int]:
    """The server's processes running a pooled sandbox's kernel agent."""
    found = []
    for pid in descendants(server):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"sandbox_provisioner.agent" in cmdline and b"serve --listen-fd" in cmdline:
            found.append(pid)
    return found


@pytest.mark.usefixtures("controller")
def test_claims_left_by_a_crashed_run_are_deleted_at_start(k8s, namespace, cluster, tmp_path):
    make_template(k8s, namespace, "t")
    make_pool(k8s, namespace, "p", replicas=0, template="t")
    ours, theirs = f"srv-{namespace}", f"other-{namespace}"
    for name, server in (("left-behind", ours), ("someone-elses", theirs)):
        k8s.create(CLAIMS, namespace, {
            "metadata": {"name": name, "labels": {
                api.LABEL_KERNEL_SERVER: api.unique_label_value(server), api.LABEL_KERNEL_ID: "k"}},
            "spec": {"warmPoolRef": {"name": "p"}},
        })  # fmt: skip
    # Named as an allowed kernelspec of the example configuration (JUPYTER_PATH comes first).
    kernels = tmp_path / "data" / "kernels" / "sandboxed-python-gvisor"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cluster", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "sandbox-provisioner", "config": {
            "runtime": "kubernetes", "warm_pool": "p", "namespace": namespace,
            "kubeconfig": str(cluster.kubeconfig), "server_id": ours}}},
    }))  # fmt: skip
    root = tmp_path / "root"
    root.mkdir()
    proc, port, log = start_server(root, {"JUPYTER_PATH": str(tmp_path / "data")})
    try:
        wait_up(proc, port, log)
        wait_for(lambda: k8s.get(CLAIMS, namespace, "left-behind") is None, 60,
                 "the orphaned claim to be deleted")  # fmt: skip
        assert k8s.get(CLAIMS, namespace, "someone-elses") is not None
        assert api_call(port, "GET", "/api/kernels") == []  # no kernel was needed for it
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "left behind by an earlier run" in log.read_text()


def test_the_sweep_removes_only_cgroups_no_sandbox_is_in():
    """What a SIGKILLed server's sandboxes leave: empty cgroups in every v1 hierarchy. The
    sweep every server runs when it starts removes those once they are a minute old, and
    never a group a process is in (another server's running sandbox) or one just made."""
    import os
    import subprocess
    import uuid

    from sandbox_provisioner.limits import CgroupV1, sweep_cgroups
    from sandbox_provisioner.spec import ResourceLimits

    if not cgroups_available():
        if os.environ.get("CI"):
            pytest.fail("cgroup v1 is not available to this (root) test run")
        pytest.skip("cgroup v1 groups need root")
    prefix = f"kernel-sweeptest-{uuid.uuid4().hex[:8]}"
    limits = ResourceLimits(memory_bytes=256 << 20, cpus=1.0, pids=64)
    left, live = CgroupV1(f"{prefix}-left"), CgroupV1(f"{prefix}-live")
    left.create(limits)
    live.create(limits)
    sleeper = subprocess.Popen(live.join_argv(["sleep", "60"]))
    try:
        wait_for(lambda: live.pids(), 10, "the process in its group")
        dirs = lambda group: list(CGROUP_ROOT.glob(f"*/{group.relpath}"))  # noqa: E731
        assert len(dirs(left)) >= 3 and len(dirs(live)) >= 3
        assert sweep_cgroups(prefix=prefix) == []  # both are younger than a minute
        left_dirs = {str(d.relative_to(CGROUP_ROOT)) for d in dirs(left)}
        removed = sweep_cgroups(older_than=0, prefix=prefix)
        assert dirs(left) == []
        assert set(removed) == left_dirs  # and nothing of the live group
        assert all(d.is_dir() for d in dirs(live)) and dirs(live)  # a process is in it
    finally:
        sleeper.kill()
        sleeper.wait()
    wait_for(lambda: not live.pids(), 10, "the process to go")
    sweep_cgroups(older_than=0, prefix=prefix)
    assert list(CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}/{prefix}*")) == []


def test_the_sweep_removes_only_kernel_dirs_no_kernel_listens_in(tmp_path: Path):
    """A SIGKILLed server leaves its kernels' directories in the shared state root; the
    next server's sweep removes those once untouched for a while, and never the
    directory of a running kernel (of any server: its sockets accept) nor a new one."""
    import os
    import socket
    import time

    from sandbox_provisioner.instance import sweep_kernel_dirs

    def kernel_dir(name: str, listening: bool, age: float) -> tuple[Path, socket.socket]:
        ipc = tmp_path / name / "ipc"
        ipc.mkdir(parents=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(ipc / "k-1"))
        if listening:
            sock.listen()
        else:
            sock.close()  # its file stays, as a dead kernel's does
        old = time.time() - age
        for path in (ipc, ipc.parent):
            os.utime(path, (old, old))
        return ipc.parent, sock

    dead, _ = kernel_dir("dead", listening=False, age=3600)
    live, server = kernel_dir("live", listening=True, age=3600)
    new, _ = kernel_dir("new", listening=False, age=0)
    (tmp_path / "servers").mkdir()
    try:
        assert sweep_kernel_dirs(tmp_path) == [dead]
        assert not dead.exists() and live.is_dir() and new.is_dir()
        assert (tmp_path / "servers").is_dir()
    finally:
        server.close()
