"""What the local runtimes share: a sandbox whose monitor is a host process.

bubblewrap and runsc both run in the foreground as a child of the server;
the child's exit status is the kernel's. A handle rebuilt from provisioner
info (another server process) cannot ``waitpid`` a process it did not start,
so it watches the pid, guarded by the process start time against pid reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from ..limits import CgroupV1, can_freeze, rlimit_argv
from ..spec import SandboxSpec
from .base import Sandbox

#: Signals are delivered to a sandbox's processes; an exited sandbox's are gone.
_GONE = (ProcessLookupError, ChildProcessError)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(pid: int, start_time: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` still runs (zombies do not)."""
    fields = _stat_fields(pid)
    return (
        bool(fields)
        and start_time is not None
        and int(fields[19]) == start_time
        and (fields[0] != "Z")
    )


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        kids = children(queue.pop())
        found += kids
        queue += kids
    return found


def innermost_pid(pid: int) -> int | None:
    """The pid that ``pid`` has in its own (innermost) pid namespace."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


def spawn(argv: list[str], spec: SandboxSpec, env: dict[str, str], pass_fds=()) -> subprocess.Popen:
    """Start a sandbox monitor in its own session, output appended to the kernel log."""
    with open(spec.log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec.state_dir,
            start_new_session=True,  # a Ctrl-C at the server's terminal stays there
            pass_fds=pass_fds,
        )


def limited(argv: list[str], spec: SandboxSpec, cgroup: CgroupV1 | None) -> list[str]:
    """Wrap a launch command so that the sandbox's limits hold from its first process."""
    if not spec.limits.any:
        return argv
    if cgroup is not None:
        cgroup.create(spec.limits)
        return cgroup.join_argv(argv)
    return rlimit_argv(spec.limits, argv)


class LocalSandbox(Sandbox):
    """A sandbox run by a monitor process on this host (bwrap or ``runsc run``)."""

    def __init__(
        self,
        *,
        pid: int,
        process: subprocess.Popen | None = None,
        start_time: int | None = None,
        cgroup: CgroupV1 | None = None,
    ):
        self.pid = pid
        self.process = process
        self.start_time = start_time if start_time is not None else process_start_time(pid)
        self.cgroup = cgroup
        self._exit_code: int | None = None

    # -- liveness -------------------------------------------------------------------------
    def _alive(self) -> bool:
        return is_running(self.pid, self.start_time)

    async def poll(self) -> int | None:
        if self._exit_code is not None:
            return self._exit_code
        if self.process is not None:
            self._exit_code = self.process.poll()
        elif not self._alive():
            self._exit_code = 0  # not our child: its status is not ours to read
        return self._exit_code

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.05)
        return code

    def host_pids(self) -> list[int]:
        if self._exit_code is not None or not self._alive():
            return []
        return [self.pid, *descendants(self.pid)]

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    # -- signals --------------------------------------------------------------------------
    def _signal_monitor(self, signum: int) -> None:
        if self._exit_code is None and (self.process is not None or self._alive()):
            with contextlib.suppress(*_GONE):
                os.kill(self.pid, signum)

    async def kill(self) -> None:
        self._signal_monitor(signal.SIGKILL)
        if self.cgroup is not None:
            for pid in self.cgroup.pids():
                with contextlib.suppress(*_GONE):
                    os.kill(pid, signal.SIGKILL)
        self.thaw()  # a frozen process takes its SIGKILL only once it runs

    def freezer(self) -> str | None:
        if self.cgroup is not None and can_freeze(self.cgroup.relpath):
            return self.cgroup.relpath
        return None

    async def cleanup(self) -> None:
        if await self.poll() is None:
            await self.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), timeout=10)
        if self.cgroup is not None:
            # The pid namespace dies with its init; the kernel reaps it a moment later.
            await self.cgroup.end()

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "cgroup": self.cgroup.relpath.rsplit("/", 1)[-1] if self.cgroup else None,
        }
