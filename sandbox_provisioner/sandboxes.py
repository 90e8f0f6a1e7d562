"""Every sandbox on this machine, as an administrator asks after them (``jupyter sandbox ps``).

Under gVisor a user's code runs inside runsc's processes, which are root's: ``ps -u
<uid>`` shows nothing for a running user. Every local sandbox of this project has a
cgroup of its own below ``jupyter-sandbox/`` (joined as it starts, by its runtime or by
runsc), so the cgroups are the list: per sandbox, its processes, CPU time (cpuacct),
memory (PSS of its host processes), age, and whether it is frozen (the freezer).

Whose a sandbox is comes from *describers*, found through the entry-point group
:data:`DESCRIBERS`: each gets a sandbox and may say what it is and how to end it
safely. The Hub's spawner describes its users' servers (a Hub's instance, a user,
a server); anything else is described here by the process that started it (a
notebook server for its kernels). Ending a sandbox is a describer's business when it
has one (a Hub server: its supervisor is asked to stop, and the Hub sees it stopped);
otherwise every process of its cgroup is killed (a kernel's server then restarts the
kernel, as after running out of memory).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .limits import CGROUP_PARENT, CGROUP_ROOT, cgroup_processes, is_frozen, thaw_cgroup
from .runtimes.gvisor import GVisorRuntime
from .runtimes.process import _stat_fields, process_start_time

#: Entry-point group of describers: ``describe(sandbox: Sandbox) -> bool`` fills in
#: ``kind``, ``owner`` and perhaps ``end`` of a sandbox it knows, and says whether it did.
DESCRIBERS = "sandbox_provisioner.describers"
#: Processes that run sandboxes rather than being their user's work.
_MACHINERY = {"bwrap", "runsc", "runsc-gofer", "runsc-sandbox", "exe", "setpriv", "sh",
              "prlimit"}  # fmt: skip


@dataclass
class Sandbox:
    """One sandbox: its cgroup's name below ``jupyter-sandbox/`` and what is known of it."""

    name: str
    runtime: str = "?"
    state: str = "running"
    pids: list[int] = field(default_factory=list)
    uptime: float = 0.0
    cpu_seconds: float | None = None
    pss_bytes: int = 0
    kind: str = "sandbox"
    owner: str = ""
    #: The process that started it (outside the sandbox), when one is found, and its start
    #: time (a pid is checked against it before it is signalled: pids are reused).
    parent: int | None = None
    parent_start: int | None = None
    #: A describer's way to end it; None: kill its cgroup's processes.
    end: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("end")
        return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def memory_bytes(pids: list[int]) -> tuple[int, int]:
    """RSS and PSS summed over ``pids``: RSS counts a shared page in each process that maps
    it (gVisor's systrap maps the Sentry's memory into its stub processes too), PSS divides
    it among them."""
    totals = {"Rss:": 0, "Pss:": 0}
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            parts = line.split()
            if parts and parts[0] in totals:
                totals[parts[0]] += int(parts[1]) * 1024
    return totals["Rss:"], totals["Pss:"]


def _uptime(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        booted = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    starts = [int(f[19]) for p in pids if (f := _stat_fields(p))]
    return time.time() - (booted + min(starts) / ticks) if starts else 0.0


def _cpu_seconds(relpath: str) -> float | None:
    try:
        return int((CGROUP_ROOT / "cpuacct" / relpath / "cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


def _describe_by_parent(sandbox: Sandbox) -> None:
    """The first process above the sandbox that is not sandbox machinery: who started it."""
    inside = set(sandbox.pids)
    for pid in sandbox.pids:
        up = _parent(pid)
        while up and up > 1 and (up in inside or _comm(up) in _MACHINERY):
            up = _parent(up)
        if up and up > 1:
            sandbox.parent, sandbox.parent_start = up, process_start_time(up)
            argv = _cmdline(up)
            sandbox.owner = f"pid {up}: {' '.join(argv)[:80]}"
            return


def _describers() -> list[Callable[[Sandbox], bool]]:
    found = []
    for entry in entry_points(group=DESCRIBERS):
        with contextlib.suppress(Exception):  # one broken plug-in hides nothing else
            found.append(entry.load())
    return found


def list_sandboxes() -> list[Sandbox]:
    """Every sandbox with a process in it, oldest first."""
    names: set[str] = set()
    for hierarchy in ("freezer", "cpuacct", "memory", "pids"):
        parent = CGROUP_ROOT / hierarchy / CGROUP_PARENT
        if parent.is_dir():
            names.update(p.name for p in parent.iterdir() if p.is_dir())
    describers = _describers()
    found = []
    for name in sorted(names):
        relpath = f"{CGROUP_PARENT}/{name}"
        pids = cgroup_processes(relpath)
        if not pids:
            continue
        sandbox = Sandbox(
            name=name, pids=pids, uptime=_uptime(pids), cpu_seconds=_cpu_seconds(relpath),
            pss_bytes=memory_bytes(pids)[1], state="frozen" if is_frozen(relpath) else "running",
            # By name: runsc's container ids are its cgroups' (processes' names are the
            # user's to change under bubblewrap; kernel ids may not take runsc's prefix).
            runtime="gvisor" if name.startswith(GVisorRuntime.cgroup_name("")) else "bubblewrap",
        )  # fmt: skip
        _describe_by_parent(sandbox)
        if "template" in name:
            sandbox.kind = "template"
        elif sandbox.parent is not None:
            sandbox.kind = "kernel"
        for describe in describers:
            with contextlib.suppress(Exception):
                if describe(sandbox):
                    break
        found.append(sandbox)
    return sorted(found, key=lambda s: -s.uptime)


def end(sandbox: Sandbox) -> None:
    """End ``sandbox`` as its describer says, else kill every process of its cgroup
    (thawed after, so that a frozen one takes the signal)."""
    if sandbox.end is not None:
        sandbox.end()
        return
    relpath = f"{CGROUP_PARENT}/{sandbox.name}"
    for pid in cgroup_processes(relpath):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    thaw_cgroup(relpath)
