"""Resource limits: parsing, and enforcement with cgroups (root) or rlimits.

Machines of this project's kind run hybrid cgroups where the v1 hierarchies
hold memory, cpu and pids, so root gets real limits from cgroup v1. Without
root only rlimits remain (address space and process count, no CPU share);
cgroup v2 through a delegated systemd scope is not implemented yet.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
from pathlib import Path

from .spec import ResourceLimits

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Parent cgroup of every sandbox's own cgroup, in each v1 controller.
CGROUP_PARENT = "jupyter-sandbox"
_CONTROLLERS = ("memory", "pids", "cpu")

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
        for controller in _CONTROLLERS:
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
            f"echo $$ > {shlex.quote(str(self.path(c) / 'cgroup.procs'))}" for c in _CONTROLLERS
        )
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sandbox-cgroup", *argv]

    def pids(self) -> list[int]:
        procs = self.path("pids") / "cgroup.procs"
        try:
            return [int(p) for p in procs.read_text().split()]
        except OSError:
            return []

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


def remove_cgroup_dirs(relpath: str) -> None:
    """rmdir ``relpath`` (and then its parent, when empty) in every v1 hierarchy."""
    roots = [p for p in CGROUP_ROOT.iterdir() if p.is_dir()] if CGROUP_ROOT.is_dir() else []
    for root in roots:
        path = root / relpath
        if not path.is_dir():
            continue
        # Children first (runsc may nest), then the group, then the shared parent.
        for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # fails (EBUSY) while other sandboxes live: fine


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
