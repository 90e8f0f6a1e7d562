"""Resource limits: parsing, and enforcement with cgroups (root) or rlimits.

Machines of this project's kind run hybrid cgroups where the v1 hierarchies
hold memory, cpu and pids, so root gets real limits from cgroup v1. Without
root only rlimits remain (address space and process count, no CPU share);
cgroup v2 through a delegated systemd scope is not implemented yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from .spec import ResourceLimits

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Parent cgroup of every sandbox's own cgroup, in each v1 controller.
CGROUP_PARENT = "jupyter-sandbox"
_CONTROLLERS = ("memory", "pids", "cpu")
#: The v1 freezer, joined too where it is mounted: a sandbox's processes stopped as one
#: (a server frozen when idle, :func:`freeze_cgroup`), none of them missed or run on.
FREEZER = "freezer"
#: Joined where mounted, for no limit: the freezer, and cpuacct (a sandbox's CPU time).
_ACCOUNTS = (FREEZER, "cpuacct")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int | None, what: str = "size") -> int | None:
    """Parse ``"512M"``, ``"2G"``, ``"1.5GiB"`` or a byte count; ``None``/``0``/``""`` = no limit.

    Units are binary (K = 1024), as for memory everywhere in Linux.
    """
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid {what} {value!r}: expected bytes or a size like '2G'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid {what} {value!r}: must not be negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"invalid {what} {value!r}: expected bytes or a size like '512M' or '2G'")
    number, unit, _ = match.groups()
    size = int(float(number) * _FACTORS[unit.lower()])
    return size or None


def cgroups_available() -> bool:
    """True when this process may create cgroup v1 groups for memory, cpu and pids."""
    return os.geteuid() == 0 and all(
        (CGROUP_ROOT / c / "cgroup.procs").exists() for c in _CONTROLLERS
    )


def cgroup_relpath(name: str) -> str:
    return f"{CGROUP_PARENT}/{name}"


def _joined() -> tuple[str, ...]:
    """The controllers a sandbox joins: the limits', then the freezer and cpuacct where
    they are mounted (runsc makes its sandboxes' groups in every hierarchy itself)."""
    extra = [c for c in _ACCOUNTS if (CGROUP_ROOT / c / "cgroup.procs").exists()]
    return (*_CONTROLLERS, *extra)


class FreezeError(RuntimeError):
    """A sandbox cannot be frozen (or thawed); the message says why."""


def _freezer_state(relpath: str) -> Path:
    return CGROUP_ROOT / FREEZER / relpath / "freezer.state"


def can_freeze(relpath: str) -> bool:
    """Whether the group ``relpath`` has a freezer (a sandbox that joined one)."""
    return _freezer_state(relpath).exists()


def is_frozen(relpath: str) -> bool:
    """Whether the group ``relpath`` is frozen (or freezing)."""
    try:
        return _freezer_state(relpath).read_text().strip() != "THAWED"
    except OSError:
        return False


async def freeze_cgroup(relpath: str, timeout: float = 5.0) -> None:
    """Stop every process of the group ``relpath`` where it is (no CPU, memory kept).

    The kernel freezes a group's tasks one by one (FREEZING) until none runs (FROZEN);
    one in an uninterruptible wait can hold that up, so after ``timeout`` seconds the
    group is thawed again and :class:`FreezeError` raised: never left half-frozen."""
    state = _freezer_state(relpath)
    if not state.exists():
        raise FreezeError(f"the sandbox's cgroup {relpath} has no freezer (cgroup v1 "
                          "freezer not mounted, or the sandbox joined no cgroup)")  # fmt: skip
    state.write_text("FROZEN")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while state.read_text().strip() != "FROZEN":
            if loop.time() > deadline:
                raise FreezeError(f"the sandbox's processes did not all stop within "
                                  f"{timeout}s (one in an uninterruptible wait?): it runs on")
            state.write_text("FROZEN")  # v1: writing again retries the tasks not yet frozen
            await asyncio.sleep(0.01)
    except BaseException:  # timed out, or cancelled (a stop came): thawed, never half-frozen
        thaw_cgroup(relpath)
        raise


def thaw_cgroup(relpath: str) -> None:
    """Let the group ``relpath``'s processes run again (nothing if it has no freezer, or
    is going: a group being removed answers ENODEV)."""
    with contextlib.suppress(OSError):
        _freezer_state(relpath).write_text("THAWED")


def clear_leftover(relpath: str) -> None:
    """Before a sandbox takes the group name ``relpath``: processes left frozen there by a
    sandbox of that name whose monitor was killed (a SIGKILL waits, pending, while its
    target is frozen) are killed and thawed, so that they end and the new sandbox does not
    join a frozen group. Names are per sandbox: a live one never shares it."""
    if not is_frozen(relpath):
        return
    log.warning("the cgroup %s was left frozen by an ended sandbox: ending its processes",
                relpath)  # fmt: skip
    for pid in cgroup_processes(relpath):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    thaw_cgroup(relpath)


class CgroupV1:
    """The per-sandbox cgroups of one sandbox, one per v1 controller.

    Created before launch with limits written, joined by the launch wrapper
    (see :meth:`join_argv`) so that every process of the sandbox is counted
    from its first instruction, and removed in :meth:`destroy`.
    """

    def __init__(self, name: str):
        self.relpath = cgroup_relpath(name)

    def path(self, controller: str) -> Path:
        return CGROUP_ROOT / controller / self.relpath

    def create(self, limits: ResourceLimits) -> None:
        clear_leftover(self.relpath)
        for controller in _joined():
            self.path(controller).mkdir(parents=True, exist_ok=True)
        if limits.memory_bytes:
            mem = self.path("memory")
            (mem / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            # No swap on top of the limit: memsw exists only with swap accounting.
            memsw = mem / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                with contextlib.suppress(OSError):
                    memsw.write_text(str(limits.memory_bytes))
        if limits.pids:
            (self.path("pids") / "pids.max").write_text(str(limits.pids))
        if limits.cpus:
            period = 100_000
            cpu = self.path("cpu")
            (cpu / "cpu.cfs_period_us").write_text(str(period))
            (cpu / "cpu.cfs_quota_us").write_text(str(int(limits.cpus * period)))

    def join_argv(self, argv: list[str]) -> list[str]:
        """Wrap ``argv`` so that it runs inside these cgroups from the start."""
        joins = " && ".join(
            f"echo $$ > {shlex.quote(str(self.path(c) / 'cgroup.procs'))}" for c in _joined()
        )
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sandbox-cgroup", *argv]

    def pids(self) -> list[int]:
        return cgroup_processes(self.relpath)

    def oom_killed(self) -> bool:
        """True when the memory limit killed a process of this sandbox."""
        try:
            text = (self.path("memory") / "memory.oom_control").read_text()
        except OSError:
            return False
        fields = dict(line.split() for line in text.splitlines() if " " in line)
        return int(fields.get("oom_kill", "0")) > 0

    def destroy(self) -> None:
        """Remove the cgroups (every controller, as runsc creates them in all)."""
        remove_cgroup_dirs(self.relpath)

    async def end(self) -> bool:
        """Remove the cgroups of the ended sandbox: :func:`end_cgroup_dirs`."""
        return await end_cgroup_dirs(self.relpath)


class OomWatch:
    """Call ``on_oom`` when the memory cgroup ``relpath`` meets its limit: cgroup v1's OOM
    notifier, an eventfd registered in ``cgroup.event_control`` against the group's
    ``memory.oom_control``. It fires when the OOM killer is about to pick a process,
    whichever it picks: a sandbox whose runtime does not survive losing one of its
    processes (gVisor's systrap stubs) is ended whole instead of wedged."""

    def __init__(self, relpath: str, on_oom: Any):
        self.relpath = relpath
        self.memory = CGROUP_ROOT / "memory" / relpath
        self.on_oom = on_oom
        self._fds: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, timeout: float = 30.0) -> bool:
        """Register once the group exists (the runtime makes it as it starts); False if it
        never appeared or the kernel has no v1 notifier."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        control = self.memory / "memory.oom_control"
        while not control.exists():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.02)
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._fds.append(efd)
            ofd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
            self._fds.append(ofd)
            (self.memory / "cgroup.event_control").write_text(f"{efd} {ofd}")
        except OSError:
            self.close()
            return False
        self._loop = loop
        loop.add_reader(efd, self._fired)
        return True

    def _fired(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._fds[0])
        self.close()
        # The notifier also fires when the group is removed, as a runtime removes it when
        # its sandbox ends by itself: that is no OOM.
        if (self.memory / "memory.oom_control").exists():
            self.on_oom()

    def close(self) -> None:
        if self._loop is not None and self._fds:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fds[0])
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds, self._loop = [], None


async def remove_cgroup_dirs_when_empty(relpath: str, timeout: float = 5.0) -> bool:
    """:func:`remove_cgroup_dirs`, again until the groups' last processes have exited (a
    sandbox's own processes, such as gVisor's Sentry, end a moment after the one that was
    waited for) or ``timeout`` passes; True when no group is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not remove_cgroup_dirs(relpath):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def end_cgroup_dirs(relpath: str, timeout: float = 5.0) -> bool:
    """Remove the groups ``relpath`` of a sandbox that has ended; True when none is left.

    Its last processes leave a moment after the one that was waited for (the pid
    namespace's members after its init, gVisor's Sentry and gofer after its monitor),
    slowly on a loaded machine: they get ``timeout`` seconds, then what is still in the
    groups is killed. Only the sandbox's own processes can be there (the groups are per
    sandbox, joined as it starts), so nothing else is touched. Groups still busy after
    that are left, with a warning, to the next server start's sweep.
    """
    thaw_cgroup(relpath)  # a frozen process would hold its exit (and a SIGKILL) for ever
    if await remove_cgroup_dirs_when_empty(relpath, timeout):
        return True
    for pid in cgroup_processes(relpath):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    thaw_cgroup(relpath)
    if await remove_cgroup_dirs_when_empty(relpath, timeout=10.0):
        return True
    log.warning("the cgroups %s are still busy; the next server start sweeps them", relpath)
    return False


def _hierarchies() -> list[Path]:
    """The mounted v1 hierarchies (one directory per controller, or controllers)."""
    return [p for p in CGROUP_ROOT.iterdir() if p.is_dir()] if CGROUP_ROOT.is_dir() else []


def cgroup_processes(relpath: str) -> list[int]:
    """The processes in the groups ``relpath`` (and groups nested in them), in every v1
    hierarchy."""
    pids: set[int] = set()
    for root in _hierarchies():
        path = root / relpath
        if not path.is_dir():
            continue
        for procs in path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def remove_cgroup_dirs(relpath: str) -> bool:
    """rmdir ``relpath`` (and then its parent, when empty) in every v1 hierarchy; True
    when none is left (False: a process is still in one)."""
    left = False
    for root in _hierarchies():
        path = root / relpath
        if not path.is_dir():
            continue
        # Children first (runsc may nest), then the group, then the shared parent.
        for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        try:
            path.rmdir()
        except OSError:
            left = True
            continue
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # fails (EBUSY) while other sandboxes live: fine
    return not left


#: A sandbox joins its cgroup as it starts: an empty one older than this is left over.
STALE_CGROUP_AGE = 60.0


def sweep_cgroups(older_than: float = STALE_CGROUP_AGE, prefix: str = "") -> list[str]:
    """Remove sandbox cgroups that no process is in and that were made more than
    ``older_than`` seconds ago, in every v1 hierarchy; the removed (``controller/path``).

    What they are: the groups of sandboxes whose server died (SIGKILL) or whose runsc
    monitor was killed before either could clean up. Whose they were does not matter:
    the kernel refuses to remove a cgroup a process is in (EBUSY), so no running
    sandbox of any server loses its group, and the age spares one being made right now.
    ``prefix`` limits the sweep to groups whose name starts with it.
    """
    removed: list[str] = []
    now = time.time()
    for root in _hierarchies():
        parent = root / CGROUP_PARENT
        if not parent.is_dir():
            continue
        groups = [p for g in parent.glob(f"{prefix}*") for p in [*g.rglob("*"), g] if p.is_dir()]
        for group in sorted(groups, key=lambda p: len(p.parts), reverse=True):  # children first
            try:
                if now - group.stat().st_ctime < older_than:
                    continue
                if (group / "cgroup.procs").read_text().strip():
                    continue
                group.rmdir()
            except OSError:
                continue
            removed.append(str(group.relative_to(CGROUP_ROOT)))
    return removed


def rlimit_argv(limits: ResourceLimits, argv: list[str]) -> list[str]:
    """Wrap ``argv`` in util-linux ``prlimit`` for the limits rlimits can express."""
    options = []
    if limits.memory_bytes:
        options.append(f"--as={limits.memory_bytes}")
    if limits.pids:
        options.append(f"--nproc={limits.pids}")
    if not options:
        return argv
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise RuntimeError(
            "resource limits without root need util-linux's 'prlimit' "
            "(apt-get install util-linux), or set the limits to 0"
        )
    return [prlimit, *options, "--", *argv]
