"""``jupyter sandbox ps``: every sandbox on the machine, whose it is, and ending one.

A real Hub (gVisor servers: their processes are root's runsc, so ``ps -u <uid>`` shows
nothing of them) beside a sandboxed kernel this test starts itself through
jupyter_client (bubblewrap); the command runs as an administrator would run it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hub_fixtures import processes_of, supervisors

from sandbox_spawner import freezing


def ps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox_provisioner.cli", "ps", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def listed() -> dict[str, dict]:
    done = ps("--json")
    assert done.returncode == 0, done.stderr
    return {s["name"]: s for s in json.loads(done.stdout)}


async def test_ps_lists_every_sandbox_with_its_owner_and_ends_one(gvisor_hub, tmp_path):
    from conftest import require_runtime
    from test_errors import manager

    require_runtime("bubblewrap")
    hub = gvisor_hub
    for name in ("pat", "quinn"):
        await hub.spawn(name)
    pat, quinn = await hub.state("pat"), await hub.state("quinn")
    answer = await freezing.request(quinn["freezer"], {"do": "freeze", "quiet": 0})
    assert answer["ok"], answer
    km = manager("bubblewrap")
    await km.start_kernel(cwd=str(tmp_path))
    try:
        found = listed()
        owners = [(s["name"], s["owner"]) for s in found.values()]
        servers = {s["owner"].split(": ", 1)[1]: s for s in found.values()
                   if s["kind"] == "server" and s["owner"].endswith((": pat", ": quinn"))}
        assert set(servers) == {"pat", "quinn"}, owners
        for server in servers.values():
            assert server["runtime"] == "gvisor"
            assert server["pss_bytes"] > 20 * 2**20 and server["cpu_seconds"] > 0, server
            assert server["uptime"] > 0 and server["pids"], server
        assert servers["pat"]["state"] == "running"
        assert servers["quinn"]["state"] == "frozen"
        # The user's uid has no process of its own: the sandbox's are root's runsc.
        uid = (hub.root / "homes" / "pat").stat().st_uid
        assert processes_of(uid) == [] and servers["pat"]["pids"]
        kernels = [s for s in found.values() if km.kernel_id in s["name"]]
        assert len(kernels) == 1 and kernels[0]["kind"] == "kernel", found
        assert kernels[0]["runtime"] == "bubblewrap"
        assert kernels[0]["owner"].startswith(f"pid {os.getpid()}: ")
        table = ps()
        assert table.returncode == 0 and "quinn" in table.stdout and "frozen" in table.stdout

        # Ending pat's server: its supervisor stops it, as the Hub would; quinn's stays.
        ended = ps(f"--end={servers['pat']['name']}")
        assert ended.returncode == 0 and "ended" in ended.stdout, ended
        deadline = time.monotonic() + 30
        while Path(pat["state_dir"]).joinpath("exit").exists() is False:
            assert time.monotonic() < deadline, "pat's supervisor did not stop its server"
            await asyncio.sleep(0.2)
        assert pat["supervisor_pid"] not in supervisors(hub.root)
        after = listed()
        assert servers["pat"]["name"] not in after
        assert after[servers["quinn"]["name"]]["state"] == "frozen"
        # Ending the kernel: every process of its sandbox.
        assert ps(f"--end={kernels[0]['name']}").returncode == 0
        deadline = time.monotonic() + 30
        while await km.is_alive():
            assert time.monotonic() < deadline, "the kernel's sandbox still runs"
            await asyncio.sleep(0.2)
        assert ps("--end=no-such-sandbox").returncode == 1
    finally:
        await km.shutdown_kernel(now=True)
    assert quinn["supervisor_pid"] in supervisors(hub.root)


def test_a_sandbox_named_as_a_hubs_is_not_taken_for_it():
    """A cgroup named as a Hub's server (a kernel id once could take such a name) but not
    started by that server's supervisor: ps says so, and attributes it to no user; ending
    it kills its own processes only."""
    from sandbox_provisioner.limits import CgroupV1, ResourceLimits

    group = CgroupV1("hub-0123456789ab-2-spoof")
    group.create(ResourceLimits(pids=16))
    proc = subprocess.Popen(group.join_argv(["sleep", "300"]))
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while not group.pids():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        found = listed()["hub-0123456789ab-2-spoof"]
        assert found["kind"] == "sandbox", found
        assert found["owner"].startswith("named as Hub 0123456789ab's, but not started by "
                                         "its supervisor"), found  # fmt: skip
        assert ps("--end=hub-0123456789ab-2-spoof").returncode == 0
        proc.wait(timeout=10)
        assert bystander.poll() is None, "nothing outside the sandbox was touched"
    finally:
        for p in (proc, bystander):
            p.kill()
            p.wait()
        group.destroy()
