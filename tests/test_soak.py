"""Many kernels started and ended in a row leave nothing behind.

Each runtime runs start / execute / shutdown cycles, every cycle in a new notebook
directory (a new filesystem layout: for gVisor a new template, with room for two so
that templates are also evicted), then its pools and templates end as the server's
exit ends them. Afterwards the host has exactly what it had before: no sandbox
process, no cgroup directory in any v1 hierarchy, no mount, no kernel directory in
the state root, no directory of a server that is gone.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import RUNTIMES, async_wait_until, require_runtime

from sandbox_provisioner import instance, templates
from sandbox_provisioner.limits import CGROUP_PARENT, CGROUP_ROOT
from sandbox_provisioner.pool import close_pools
from sandbox_provisioner.provisioner import SandboxProvisioner

CYCLES = 6


def sandbox_processes() -> set[int]:
    """Processes of sandboxes (bwrap, runsc and what runs inside them as other uids)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) in (b"bwrap", b"runsc", b"runsc-sandbox", b"runsc-gofer"):
            found.add(int(entry.name))
    return found


def cgroup_dirs() -> set[str]:
    return {str(p) for p in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}/**") if p.is_dir()} - {
        str(p) for p in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}")
    }


def mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def state_entries() -> set[str]:
    """Kernel directories in the state root, and directories of other servers (this
    process's own lives as long as it does)."""
    root = Path(SandboxProvisioner().state_root)
    found = {p.name for p in root.iterdir() if p.name != "servers"} if root.is_dir() else set()
    servers, mine = root / "servers", {d for d, _ in instance._MINE.values()}
    if servers.is_dir():
        found |= {f"servers/{p.name}" for p in servers.iterdir() if p not in mine}
    return found


def snapshot() -> dict[str, object]:
    return {
        "processes": sandbox_processes(),
        "cgroups": cgroup_dirs(),
        "mounts": len(mounts()),
        "state": state_entries(),
    }


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_cycles_leave_nothing_behind(runtime: str, start_kernel, tmp_path: Path):
    require_runtime(runtime)
    await close_pools()
    await templates.forget_templates()
    before = snapshot()
    config = {"snapshot_templates": True, "max_templates": 2} if runtime == "gvisor" else {}
    for i in range(CYCLES):
        workdir = tmp_path / f"notebooks-{i}"
        workdir.mkdir()
        kernel = await start_kernel(runtime, cwd=workdir, **config)
        assert (await kernel.run(f"print({i} * 2)")).stdout.strip() == str(i * 2)
        await kernel.stop()
        if runtime == "gvisor" and i == 0:  # let the first template finish: later cycles
            loop = asyncio.get_running_loop()  # restore or evict
            deadline = loop.time() + 120
            while not any(t.ready for t in templates._TEMPLATES.values()):
                assert loop.time() < deadline, "no template was built"
                await asyncio.sleep(0.1)
    if runtime == "gvisor":
        assert len(templates._TEMPLATES) <= 2
    # What the server's exit ends: its pools and its templates.
    await close_pools()
    await templates.forget_templates()

    def settled() -> bool:
        now = snapshot()
        return (
            not (now["processes"] - before["processes"])  # type: ignore[operator]
            and not (now["cgroups"] - before["cgroups"])  # type: ignore[operator]
            and now["mounts"] <= before["mounts"]  # type: ignore[operator]
            and not (now["state"] - before["state"])  # type: ignore[operator]
        )

    if not await async_wait_until(settled, timeout=20):
        now = snapshot()
        pytest.fail(
            "left behind: "
            f"processes {sorted(now['processes'] - before['processes'])}, "  # type: ignore[operator]
            f"cgroups {sorted(now['cgroups'] - before['cgroups'])}, "  # type: ignore[operator]
            f"mounts {now['mounts']} (before {before['mounts']}), "
            f"state {sorted(now['state'] - before['state'])}"  # type: ignore[operator]
        )


@pytest.mark.parametrize("runtime", ["bubblewrap", "gvisor"])
async def test_a_sandbox_whose_process_outlives_it_leaves_no_cgroup(start_kernel, runtime):
    """What the end of a sandbox leaves when one of its processes is slow to go (seen once
    in CI: a gVisor template's Sentry still in its groups when the wait for them ran out,
    and the empty groups stayed): the server ends what is still in the sandbox's groups
    and removes them. The straggler here is a process put into the sandbox's pids group."""
    import subprocess

    from sandbox_provisioner.limits import cgroup_relpath

    require_runtime(runtime)
    kernel = await start_kernel(runtime, memory_limit="1G")
    sandbox = kernel.provisioner()._sandbox
    relpath = (cgroup_relpath(sandbox.container_id) if runtime == "gvisor"
               else sandbox.cgroup.relpath)  # fmt: skip
    straggler = subprocess.Popen(["sleep", "300"])
    try:
        (CGROUP_ROOT / "pids" / relpath / "cgroup.procs").write_text(str(straggler.pid))
        await kernel.stop()
        assert straggler.wait(timeout=30) == -9
        assert not list(CGROUP_ROOT.glob(f"*/{relpath}"))
    finally:
        straggler.kill()
        straggler.wait()
