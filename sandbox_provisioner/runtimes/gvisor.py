"""gVisor: the kernel runs on a user-space kernel (the Sentry), not on the host's.

The sandbox is an OCI bundle run by ``runsc run`` in the foreground: an empty
read-only root with the spec's mounts bound in through the gofer, its own
pid/ipc/uts/mount namespaces, ``--network=none``
(loopback only) and ``--host-uds=create`` so that the kernel's ZMQ IPC
sockets appear on the host. Limits are the spec's cgroup v1 resources,
applied by runsc. The kernel is the sandbox uid (never root, see
:mod:`..identity`) with CAP_DAC_OVERRIDE inside the Sentry, so it can use the
server's files in its workspace while what it creates belongs to the sandbox
uid on the host; its host directories are staged first (:mod:`.staging`), so a
path swapped after the plan is refused rather than bound.

Facts this module is built on (measured on hosts of this project's kind):
netstack fails on kernels >= 6.11 with the Debian builds and the KVM platform
hangs, so the network is ``none`` (or ``host``). The platform is systrap on the builds
it was tested with (20240729; ptrace before): a system call costs the kernel about 1 us
there against 40-60 us under ptrace, and a cold kernel starts about 0.4 s sooner. Under
systrap the OOM killer takes one of the sandbox's stub processes and leaves the sandbox
neither dead nor answering, so the server watches each sandbox's memory cgroup
(:class:`~..limits.OomWatch`) and ends the whole sandbox when the limit is met, as a
ptrace sandbox dies; the kernel can then be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from traitlets import Bool, CaselessStrEnum, Integer, List, Unicode

from ..identity import resolve
from ..limits import (
    OomWatch,
    can_freeze,
    cgroup_relpath,
    cgroups_available,
    clear_leftover,
    end_cgroup_dirs,
)
from ..spec import Mount, MountKind, NetworkMode, SandboxSpec
from . import staging
from .base import Availability, Sandbox, SandboxRuntime
from .process import LocalSandbox, spawn

log = logging.getLogger(__name__)
#: The newest runsc release this project is tested with; later builds are refused (with
#: the reason) unless ``allow_untested_runsc``: each release so far changed something a
#: kernel relies on (capabilities, platforms).
_NEWEST_SUPPORTED = 20240729
#: The last builds that give a non-root container process the capabilities its spec names.
_NON_ROOT_CAPS_UNTIL = 20221219
#: The first build tested to mount inside a running sandbox (bind, read-only remount,
#: unmount), which local warm pools need.
_POOLING_FROM = 20240729
#: The first build tested under systrap (an older one runs ptrace when the platform is auto).
_SYSTRAP_FROM = 20240729
#: What a pooled sandbox's agent holds until it has bound its kernel's workspace: the
#: mounts, and becoming the sandbox uid for its kernels (see sandbox_provisioner.agent).
_AGENT_CAPS = [
    "CAP_SYS_ADMIN",
    "CAP_DAC_OVERRIDE",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_KILL",
]


@functools.lru_cache(maxsize=8)
def runsc_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()[0].strip() if out.stdout else out.stderr.strip()


def _release_date(version: str) -> int:
    """``runsc version 0.0~20221219.0`` or ``release-20240729.0`` -> 20221219 (0 if unknown)."""
    match = re.search(r"(20\d{6})", version)
    return int(match.group(1)) if match else 0


#: Run as the sandbox's root, by the command's own Python (``PYTHON -c BECOME UID GID
#: -m MODULE ARGS...`` or ``... -c CODE ARGS...``): become UID:GID keeping CAP_DAC_OVERRIDE
#: and nothing else, then run the module or code in this same process (as ``python -m`` or
#: ``-c`` would: gVisor has no ambient capabilities, and an exec would lose it). For builds
#: that give a non-root container process no capability.
BECOME = """
import ctypes, os, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
DAC, SETGID, SETUID, SETPCAP = 1, 6, 7, 8

def check(result):
    if result != 0:
        raise OSError(ctypes.get_errno(), "capability change refused")

def capset(*caps):
    bits = sum(1 << c for c in caps)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(bits, bits, bits, 0, 0, 0)
    check(libc.capset(header, data))

uid, gid, how, what, *rest = sys.argv[1:]
check(libc.prctl(8, 1, 0, 0, 0))  # PR_SET_KEEPCAPS
os.setgroups([])
os.setresgid(int(gid), int(gid), int(gid))
os.setresuid(int(uid), int(uid), int(uid))
capset(DAC, SETUID, SETGID, SETPCAP)
for cap in (SETUID, SETGID, SETPCAP):
    check(libc.prctl(24, cap, 0, 0, 0))  # PR_CAPBSET_DROP
capset(DAC)
del libc, check, capset
if how == "-m":
    sys.argv = [what, *rest]
    runpy.run_module(what, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
"""


class GVisorSandbox(LocalSandbox):
    """A ``runsc run`` monitor; signals go to the container's init (the kernel) via runsc."""

    def __init__(self, *, runsc: str, state_root: Path, container_id: str, **kw: Any):
        super().__init__(**kw)
        self.runsc = runsc
        self.state_root = state_root
        self.container_id = container_id
        self._oom: OomWatch | None = None
        self.oom_ended = False

    async def _runsc(self, *args: str, timeout: float = 15.0, check: bool = False) -> bool:
        """Run ``runsc ARGS`` on this sandbox; False if it did not end within ``timeout``
        seconds (a Sentry that does not answer: runsc is then killed). ``check``: raise
        RuntimeError instead, and for a failure too, with runsc's message."""
        proc = await asyncio.create_subprocess_exec(
            self.runsc,
            "--root",
            str(self.state_root),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE if check else asyncio.subprocess.DEVNULL,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if check:
                raise RuntimeError(f"runsc {args[0]} did not end") from None
            return False
        if check and proc.returncode != 0:
            raise RuntimeError(f"runsc {args[0]}: {(err or b'').decode(errors='replace')[-300:]}")
        return True

    async def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            await self.kill()
        elif await self.poll() is None:
            self.thaw()  # a frozen Sentry would never answer runsc
            if not await self._runsc("kill", self.container_id, str(int(signum))):
                log.warning("gVisor sandbox %s did not take signal %s: ending it",
                            self.container_id, signum)  # fmt: skip
                await self.kill()

    async def signal_process(self, pid: int, signum: int) -> None:
        """Signal the sandbox's process ``pid`` (its number inside) and no other."""
        await self._runsc("kill", "--pid", str(pid), self.container_id, str(int(signum)),
                          check=True)  # fmt: skip

    def freezer(self) -> str | None:
        """The sandbox's cgroup (runsc puts the Sentry, its gofer and stubs there, in
        every hierarchy: the freezer's too); runsc's monitor is outside it."""
        group = cgroup_relpath(self.container_id)
        return group if can_freeze(group) else None

    async def terminate(self) -> None:
        await self.send_signal(signal.SIGTERM)

    def watch_memory(self, relpath: str) -> None:
        """End the whole sandbox when its memory cgroup ``relpath`` meets its limit (under
        systrap the OOM killer would take one of its stubs and wedge the Sentry)."""
        self._oom = OomWatch(relpath, self._out_of_memory)
        self._oom_task = asyncio.get_running_loop().create_task(self._watch(self._oom))

    async def _watch(self, watch: OomWatch) -> None:
        if not await watch.start() and await self.poll() is None:
            log.warning("gVisor sandbox %s: its memory cgroup cannot be watched, so at its "
                        "memory limit it would hang rather than end (platform systrap); "
                        "c.GVisorRuntime.platform = 'ptrace' avoids that",
                        self.container_id)  # fmt: skip

    def _out_of_memory(self) -> None:
        self.oom_ended = True
        log.warning("gVisor sandbox %s met its memory limit; ending it", self.container_id)
        for pid in self.host_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def oom_killed(self) -> bool:
        return self.oom_ended

    async def cleanup(self) -> None:
        if self._oom is not None:
            self._oom_task.cancel()
            self._oom.close()
        await super().cleanup()
        # runsc leaves its state files and cgroups behind when its monitor is killed.
        shutil.rmtree(self.state_root, ignore_errors=True)
        await end_cgroup_dirs(cgroup_relpath(self.container_id))

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "runsc": self.runsc,
            "state_root": str(self.state_root),
            "container_id": self.container_id,
            "memory_watch": self._oom.relpath if self._oom is not None else None,
        }


class GVisorRuntime(SandboxRuntime):
    name = "gvisor"

    @staticmethod
    def cgroup_name(kernel_id: str) -> str:
        """runsc's container id, which is its cgroups' name too."""
        return f"kernel-{kernel_id}"
    description = "gVisor user-space kernel (runsc); needs root"
    strength = 20
    #: A listening host socket handed in (``--pass-fd``) refuses listen() in the Sentry.
    inherits_sockets = False
    #: The Sentry numbers files itself. A pooled agent's bind still refuses any symlink on
    #: the way (one component at a time); without the inode check, what another kernel
    #: could swap in is only a directory from its own workspace (a rename cannot cross
    #: mounts), which it could write anyway.
    host_inodes = False

    runsc_path = Unicode("", config=True, help="The runsc binary. Empty: runsc on PATH.")
    platform = CaselessStrEnum(
        ["auto", "systrap", "ptrace", "kvm"],
        default_value="auto",
        config=True,
        help="gVisor platform. auto: systrap on runsc 20240729 and later, else ptrace. "
        "systrap: system calls cost far less; a sandbox at its memory limit is ended whole "
        "by the server (the OOM killer alone would wedge it). ptrace: slower, works on every "
        "build. kvm needs a real /dev/kvm (it hangs on paravirtual KVM).",
    )
    malloc_top_pad = Integer(
        16 << 20, min=0, config=True,
        help="Bytes glibc's malloc adds to each growth of a sandboxed process's heap "
        "(GLIBC_TUNABLES=glibc.malloc.top_pad): every growth is a system call, which "
        "gVisor makes costly (a cold kernel starts about 0.1 s sooner with 16 MiB). "
        "Untouched, the pad costs no memory; freed memory up to it stays with the "
        "process. 0: glibc's default (128 KiB). A GLIBC_TUNABLES of the kernel's own "
        "environment is kept as it is.",
    )  # fmt: skip
    extra_flags = List(Unicode(), config=True, help="More global runsc flags, for experts.")
    allow_untested_runsc = Bool(
        False, config=True,
        help="Use a runsc build newer than the newest this project is tested with "
        "(20240729).",
    )  # fmt: skip

    def find_runsc(self) -> str | None:
        if self.runsc_path:
            return self.runsc_path if os.access(self.runsc_path, os.X_OK) else None
        return shutil.which("runsc")

    def availability(self) -> Availability:
        runsc = self.find_runsc()
        if runsc is None:
            return Availability(
                False,
                f"runsc not found{f' at {self.runsc_path}' if self.runsc_path else ''}",
                "install gVisor with 'apt-get install runsc' (Debian/Ubuntu) or put runsc on PATH",
            )
        if os.geteuid() != 0:
            return Availability(
                False,
                "gVisor sandboxes need root here (rootless runsc cannot bind host sockets)",
                "run the server as root or use the bubblewrap runtime",
            )
        if shutil.which("setpriv") is None:
            return Availability(False, "setpriv not found", "apt-get install util-linux")
        try:
            version = runsc_version(runsc)
        except (OSError, subprocess.SubprocessError) as exc:
            return Availability(False, f"{runsc} does not run: {exc}", "reinstall runsc")
        if _release_date(version) > _NEWEST_SUPPORTED and not self.allow_untested_runsc:
            return Availability(
                False,
                f"{version} at {runsc} is newer than the builds tested here (up to "
                f"{_NEWEST_SUPPORTED})",
                "install Debian's runsc (bookworm's 0.0~20221219, or 0.0~20240729 from "
                "bookworm-backports or trixie), or set "
                "c.GVisorRuntime.allow_untested_runsc = True to try this one",
            )  # fmt: skip
        pools = "warm pools" if self.pooling else (
            "no warm pools (they need runsc 2024 or later: on Debian bookworm, "
            "bookworm-backports' runsc, which scripts/setup installs)")  # fmt: skip
        return Availability(True, f"{version} at {runsc}, platform {self.resolved_platform()}, "
                            f"{pools}")  # fmt: skip

    def _release(self) -> int:
        """The found runsc's release date (0: none found, or it does not run)."""
        runsc = self.find_runsc()
        try:
            return _release_date(runsc_version(runsc)) if runsc else 0
        except (OSError, subprocess.SubprocessError):
            return 0

    def _non_root_gets_no_caps(self) -> bool:
        return self._release() > _NON_ROOT_CAPS_UNTIL

    @property
    def pooling(self) -> bool:  # type: ignore[override]
        """Warm pools: on builds that mount inside a running sandbox (2024 on)."""
        return self._release() >= _POOLING_FROM

    def resolved_platform(self) -> str:
        if self.platform != "auto":
            return self.platform
        return "systrap" if self._release() >= _SYSTRAP_FROM else "ptrace"

    def _tuning(self) -> dict[str, str]:
        """Environment that makes gVisor's costly system calls fewer (see malloc_top_pad)."""
        if not self.malloc_top_pad:
            return {}
        return {"GLIBC_TUNABLES": f"glibc.malloc.top_pad={self.malloc_top_pad}"}

    # -- the OCI bundle ----------------------------------------------------------------------
    def bundle(self, spec: SandboxSpec, bundle_dir: Path, cgroups: bool) -> dict[str, Any]:
        rootfs = bundle_dir / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        empty = spec.state_dir / "empty"
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["ro"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "tmpfs"},
        ]
        for mount in spec.mounts:
            entry = self._oci_mount(mount, rootfs, empty)
            if entry is not None:
                mounts.append(entry)
        resources: dict[str, Any] = {}
        if spec.limits.memory_bytes:
            resources["memory"] = {"limit": spec.limits.memory_bytes}
        if spec.limits.cpus:
            resources["cpu"] = {"quota": int(spec.limits.cpus * 100_000), "period": 100_000}
        namespaces = ["pid", "ipc", "uts", "mount"]
        if spec.network is NetworkMode.NONE:
            namespaces.append("network")  # with "host", runsc's hostinet needs the host's
        linux: dict[str, Any] = {"namespaces": [{"type": t} for t in namespaces]}
        if cgroups:
            linux["cgroupsPath"] = "/" + cgroup_relpath(_container_id(spec))
            linux["resources"] = resources
        who = spec.identity or resolve()
        # The server's files (root's) stay usable through CAP_DAC_OVERRIDE, in the Sentry only.
        caps = ["CAP_DAC_OVERRIDE"] if who.separate else []
        user = {"uid": who.uid, "gid": who.gid} if who.separate else {"uid": 0, "gid": 0}
        args = spec.argv
        readonly_root = True
        if spec.agent:
            # A pooled sandbox's agent: the sandbox's root until it has bound its kernel's
            # workspace (mount targets are made in the root's in-memory overlay, then the
            # root is sealed read-only); its kernels become the sandbox uid.
            caps, user, readonly_root = list(_AGENT_CAPS), {"uid": 0, "gid": 0}, False
            if who.separate:
                args = [*args, "--kernel-user", f"{who.uid}:{who.gid}"]
        elif spec.switches_user:  # it becomes the user's uid itself, dropping these
            caps, user = ["CAP_SETUID", "CAP_SETGID"], {"uid": 0, "gid": 0}
        elif who.separate and self._non_root_gets_no_caps():
            # This build starts a non-root process with no capability: start as the sandbox's
            # root with what becoming the uid takes, and become it keeping CAP_DAC_OVERRIDE.
            # Only a Python command can (in-process); anything else runs as the uid with no
            # capability at all, so the server's files are read-only to it.
            if len(args) >= 3 and args[1] in ("-m", "-c"):
                caps = ["CAP_DAC_OVERRIDE", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]
                user = {"uid": 0, "gid": 0}
                args = [args[0], "-c", BECOME, str(who.uid), str(who.gid), *args[1:]]
            else:
                caps = []
                self.log.warning("%s runs as uid %d with no capability (this runsc build "
                                 "gives none to a non-root process): the server's files in "
                                 "its workspace are read-only to it", args[0], who.uid)  # fmt: skip
        capabilities = {
            k: caps for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
        }
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": user,
                "args": args,
                "env": [f"{k}={v}" for k, v in {**self._tuning(), **spec.env}.items()],
                "cwd": spec.cwd,
                "capabilities": capabilities,
                "noNewPrivileges": True,
                # The Sentry counts the sandbox's own tasks against RLIMIT_NPROC. A host pids
                # cgroup would count the Sentry's threads instead (130 when idle) and starve it.
                "rlimits": [
                    {"type": "RLIMIT_NPROC", "hard": spec.limits.pids, "soft": spec.limits.pids}
                ]
                if spec.limits.pids
                else [],
            },
            "root": {"path": "rootfs", "readonly": readonly_root},
            "hostname": spec.hostname,
            "mounts": mounts,
            "linux": linux,
        }

    @staticmethod
    def _oci_mount(mount: Mount, rootfs: Path, empty: Path) -> dict[str, Any] | None:
        inside = rootfs / mount.target.lstrip("/")
        if mount.kind is MountKind.SYMLINK:
            inside.parent.mkdir(parents=True, exist_ok=True)
            if not inside.is_symlink():
                inside.symlink_to(mount.source)
            return None
        if mount.kind is MountKind.TMPFS:
            inside.mkdir(parents=True, exist_ok=True)
            return {"destination": mount.target, "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=1777",
                                "rw" if mount.writable else "ro"]}  # fmt: skip
        source = mount.source
        if mount.kind is MountKind.HIDE_FILE:
            empty.touch(mode=0o444, exist_ok=True)
            source = str(empty)
        # Mount points must exist in the read-only root before runsc starts.
        if os.path.isdir(source):
            inside.mkdir(parents=True, exist_ok=True)
        else:
            inside.parent.mkdir(parents=True, exist_ok=True)
            inside.touch(exist_ok=True)
        mode = "rw" if mount.writable else "ro"
        return {"destination": mount.target, "type": "bind", "source": source,
                "options": ["rbind", mode]}  # fmt: skip

    async def launch(self, spec: SandboxSpec) -> Sandbox:
        return self._start(spec, "run")

    async def restore(self, spec: SandboxSpec, image: Path) -> Sandbox:
        """A sandbox restored from the checkpoint ``image`` of a template whose mounts had
        the same destinations as ``spec``'s (the sources may differ)."""
        return self._start(spec, "restore", "--image-path", str(image))

    async def checkpoint(self, sandbox: GVisorSandbox, image: Path) -> None:
        """Save ``sandbox`` (which then exits) as a restorable image."""
        image.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sandbox.runsc, "--root", str(sandbox.state_root), *self._global_flags(),
            "checkpoint", "--image-path", str(image), sandbox.container_id,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"runsc checkpoint failed: {err.decode(errors='replace')[-500:]}")

    def _global_flags(self, network: str = "none", host_sockets: bool = False) -> list[str]:
        uds = "all" if host_sockets else "create"  # create: the sandbox's own IPC sockets
        return [f"--network={network}", f"--host-uds={uds}",
                f"--platform={self.resolved_platform()}", *self.extra_flags]  # fmt: skip

    def _start(self, spec: SandboxSpec, *command: str) -> GVisorSandbox:
        self.require()
        runsc = self.find_runsc()
        assert runsc is not None
        cid = _container_id(spec)
        state_root = spec.state_dir / "runsc"
        bundle_dir = spec.state_dir / "bundle"
        shutil.rmtree(state_root, ignore_errors=True)  # a previous run of this kernel
        shutil.rmtree(bundle_dir, ignore_errors=True)
        shutil.rmtree(spec.state_dir / "stage", ignore_errors=True)
        bundle_dir.mkdir(parents=True)
        staged = staging.stage(spec.mounts, spec.state_dir)
        spec = dataclasses.replace(spec, mounts=staged.mounts)
        cgroups = bool(spec.limits.memory_bytes or spec.limits.cpus) and cgroups_available()
        config = self.bundle(spec, bundle_dir, cgroups)
        fd = os.open(bundle_dir / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        network = "host" if spec.network is NetworkMode.HOST else "none"
        argv = [
            # The sandbox dies with runsc's monitor, and the monitor with the server.
            "setpriv", "--pdeathsig", "KILL", "--", *staged.prefix,
            runsc, "--root", str(state_root), *self._global_flags(network, spec.host_sockets),
        ]  # fmt: skip
        if not cgroups:
            argv.append("--ignore-cgroups")
        else:
            clear_leftover(cgroup_relpath(cid))
        if spec.agent:  # the root's writes (the agent's mount targets) stay in its memory
            argv.append("--overlay2=root:memory")
        argv += [*command, "--bundle", str(bundle_dir), cid]
        process = spawn(argv, spec, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        sandbox = GVisorSandbox(
            pid=process.pid,
            process=process,
            runsc=runsc,
            state_root=state_root,
            container_id=cid,
        )
        if cgroups and spec.limits.memory_bytes and self.resolved_platform() == "systrap":
            sandbox.watch_memory(cgroup_relpath(cid))
        return sandbox

    def reattach(self, info: dict[str, Any]) -> Sandbox:
        sandbox = GVisorSandbox(
            pid=info["pid"],
            start_time=info["start_time"],
            runsc=info["runsc"],
            state_root=Path(info["state_root"]),
            container_id=info["container_id"],
        )
        if info.get("memory_watch"):  # this server ends it at its limit too
            sandbox.watch_memory(info["memory_watch"])
        return sandbox


def _container_id(spec: SandboxSpec) -> str:
    return GVisorRuntime.cgroup_name(spec.kernel_id)
