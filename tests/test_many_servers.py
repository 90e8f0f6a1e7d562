"""Several Jupyter servers of one uid on one machine: none touches another's state.

Each "server" here is a real process using the provisioner as jupyter_server
does (a kernel manager per kernel), with the default, shared state root. Both
build a gVisor template of the same layout and keep a warm bubblewrap pool.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import require_runtime, wait_until

from sandbox_provisioner import instance, limits

SERVER = textwrap.dedent("""
    import asyncio, json, sys
    from jupyter_client.manager import AsyncKernelManager
    from sandbox_provisioner import instance, templates
    from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager
    from sandbox_provisioner.pool import close_pools

    async def kernel(runtime, cwd, **config):
        ksm = RuntimeKernelSpecManager()
        ksm.overrides = {f"sandboxed-{runtime}": config}
        km = AsyncKernelManager(kernel_name=f"sandboxed-{runtime}", kernel_spec_manager=ksm)
        await km.start_kernel(cwd=cwd)
        kc = km.client(); kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        reply = await kc.execute_interactive("print('ok')", timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
        kc.stop_channels()
        return km

    async def main(cwd):
        gvisor = await kernel("gvisor", cwd, snapshot_templates=True)
        pooled = await kernel("bubblewrap", cwd, pool_size=1, pool_root=cwd)
        while not all(t.ready or t.failed for t in templates._TEMPLATES.values()):
            await asyncio.sleep(0.1)
        (template,) = templates._TEMPLATES.values()
        print(json.dumps({"dir": str(instance.directory(gvisor.provisioner.state_root)),
                          "image": str(template.image), "ready": template.ready,
                          "kernel": str(gvisor.provisioner.kernel_dir)}), flush=True)
        if sys.stdin.readline().strip() == "again":  # a second kernel: restored, from our image
            again = await kernel("gvisor", cwd, snapshot_templates=True)
            await again.shutdown_kernel(now=True)
            print(json.dumps({"again": True}), flush=True)
            sys.stdin.readline()
        await gvisor.shutdown_kernel(now=True)
        await pooled.shutdown_kernel(now=True)
        await close_pools()

    asyncio.run(main(sys.argv[1]))
""")


def start_server(cwd: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(cwd)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline()
    assert line, f"the server exited with {proc.wait()}"
    return proc, json.loads(line)


def cgroups_of(kernel_id: str) -> list[Path]:
    """The cgroup directories (every v1 controller) of a kernel's sandbox."""
    parent = f"*/{limits.CGROUP_PARENT}/*{kernel_id}*"
    return [p for p in limits.CGROUP_ROOT.glob(parent) if p.is_dir()]


def empty(group: Path) -> bool:
    try:
        return not (group / "cgroup.procs").read_text().strip()
    except OSError:
        return True


@pytest.fixture(autouse=True)
def _runtimes() -> None:
    require_runtime("gvisor")
    require_runtime("bubblewrap")


def test_two_servers_of_one_uid_keep_their_state_apart(notebook_dir: Path):
    a, a_state = start_server(notebook_dir)
    b, b_state = start_server(notebook_dir)
    try:
        assert a_state["ready"] and b_state["ready"]
        assert a_state["dir"] != b_state["dir"] and a_state["image"] != b_state["image"]
        # A ends normally: its own directory goes, B's template and kernel stay.
        a.stdin.write("\n")
        a.stdin.flush()
        assert a.wait(timeout=120) == 0
        assert not Path(a_state["dir"]).exists()
        assert Path(b_state["image"]).is_dir() and Path(b_state["kernel"]).is_dir()
        b.stdin.write("again\n")
        b.stdin.flush()
        assert json.loads(b.stdout.readline()) == {"again": True}  # restored from its image
        # B is killed: its directory stays until the next server's sweep, which spares the
        # live ones.
        c, c_state = start_server(notebook_dir)
        os.kill(b.pid, signal.SIGKILL)
        b.wait(timeout=30)
        assert Path(b_state["dir"]).exists()
        d, d_state = start_server(notebook_dir)
        assert not Path(b_state["dir"]).exists()
        assert Path(c_state["dir"]).exists() and Path(d_state["dir"]).exists()
        # What B's kernels left (their directories, with sockets nobody listens on, and
        # their cgroups, empty: the sandboxes died with B) goes in a sweep; C's running
        # kernels keep theirs. (The sweeps' age thresholds, 10 min and 60 s, set to 0.)
        dead, live = Path(b_state["kernel"]), Path(c_state["kernel"])
        assert dead.is_dir() and wait_until(lambda: cgroups_of(dead.name) == [] or
                                            all(empty(g) for g in cgroups_of(dead.name)))
        had_cgroups = bool(cgroups_of(live.name))
        left = cgroups_of(dead.name)
        if os.geteuid() == 0:  # limits are cgroups: both kernels had theirs
            assert had_cgroups and left, (had_cgroups, left)
        removed = instance.sweep_kernel_dirs(dead.parent, older_than=0)
        limits.sweep_cgroups(older_than=0)
        assert dead in removed and not dead.exists()
        assert live.is_dir() and live not in removed
        assert cgroups_of(dead.name) == []
        assert bool(cgroups_of(live.name)) == had_cgroups
        for proc in (c, d):
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
        time.sleep(0.1)


def test_the_last_server_out_leaves_no_servers_directory(tmp_path: Path):
    """Each server removes its own directory at exit, and the last one the empty
    ``servers/`` above them; a live server's stays."""
    code = ("import sys; from sandbox_provisioner import instance; "
            "print(instance.directory(sys.argv[1]), flush=True); sys.stdin.readline()")  # fmt: skip
    state = tmp_path / "state"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(state)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    first, second = (Path(p.stdout.readline().strip()) for p in procs)
    assert first.is_dir() and second.is_dir() and first.parent == second.parent
    procs[0].communicate("\n", timeout=60)
    assert not first.exists() and second.is_dir()
    procs[1].communicate("\n", timeout=60)
    assert not second.exists() and not (state / "servers").exists()
