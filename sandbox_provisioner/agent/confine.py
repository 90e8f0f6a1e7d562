"""Inside a pooled local sandbox: bind the kernel's workspace late, then give up the power to.

A pooled sandbox starts before anyone knows which notebook it will serve. Its
agent sees a *stage* (the directory all workspaces lie under, e.g. the
server's root directory) and holds CAP_SYS_ADMIN in the sandbox's own user
namespace, nothing more. When a kernel is assigned, :func:`apply_plan` binds
exactly that kernel's workspace at its host path (with the dot files hidden
and ``.git`` read-only, as a cold sandbox has them), unmounts the stage and
makes the root read-only. Each source is opened refusing symlinks and checked
against the device and inode the server saw, then bound through its
descriptor: a path swapped after the plan cannot redirect a bind. Read-only
binds are read-only with everything mounted below them.

:func:`restrict` is how a process of the sandbox gives up privileges: every
capability but those it keeps, then a seccomp filter. The zygote does it
before it forks any kernel; the agent, once the workspace is bound.

Mount calls go through libc (``ctypes``): the standard library has no mount(2).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
from collections.abc import Iterable
from typing import Any

from ..runtimes import mount_stage
from ..runtimes.mount_stage import open_exactly

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2
_SYS_MOUNT_SETATTR, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, 0x8000, 0x1
#: statvfs flags that a bind remount must keep (the kernel refuses to clear locked ones).
_KEEP_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC}
_PR_SET_KEEPCAPS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 8, 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(platform.machine(), 126)
#: Capabilities a kernel may be given (bubblewrap's names).
CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7,
                "CAP_SETPCAP": 8, "CAP_SYS_ADMIN": 21}

_libc = ctypes.CDLL(None, use_errno=True)


class ConfineError(OSError):
    """A mount of the plan failed; the sandbox must not be used."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise ConfineError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def _remount_readonly(target: str) -> None:
    """``target`` and every mount below it read-only."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    if _libc.syscall(_SYS_MOUNT_SETATTR, -100, target.encode(), _AT_RECURSIVE,
                     ctypes.byref(attr), ctypes.sizeof(attr)) == 0:  # fmt: skip
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(-1, f"read-only {target}")
    for mount_point in _mounts_below(target):  # before Linux 5.12: one remount each
        kept = os.statvfs(mount_point).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        flags |= sum(ms for st, ms in _KEEP_FLAGS.items() if kept & st)
        _mount(None, mount_point, None, flags)


def _mounts_below(target: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target or point.startswith(target.rstrip("/") + "/"):
                found.append(point)
    return found


def _make_target(target: str, directory: bool) -> None:
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if directory:
        os.mkdir(target)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))


def _bind_exactly(source: str, target: str, expect: list[int] | None) -> None:
    fd = open_exactly(source, expect)
    try:
        _make_target(target, os.path.isdir(f"/proc/self/fd/{fd}"))
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    finally:
        os.close(fd)


def apply_plan(
    plan: list[dict[str, Any]], remove: Iterable[str], cover: Iterable[str], empty_file: str
) -> None:
    """Carry out ``plan`` (mounts as ``{kind, target, source, writable, expect}``), remove
    the agent's own mounts (its stage), cover those it still uses (the directory of the
    socket it listens on, which an unmount would break under gVisor), then seal.

    ``bind`` sources are paths in this sandbox (under the stage), ``expect`` the
    device and inode the server saw; ``hide-file`` binds ``empty_file`` over its
    target; ``tmpfs`` and ``symlink`` as in :class:`~sandbox_provisioner.spec.Mount`;
    ``unmount`` removes a mount of the pooled sandbox the kernel must not have.
    Parents come before children.
    """
    for entry in plan:
        kind, target = entry["kind"], entry["target"]
        source, writable = entry.get("source"), bool(entry.get("writable"))
        if kind == "bind":
            _bind_exactly(source, target, entry.get("expect"))
            if not writable:
                _remount_readonly(target)
        elif kind == "tmpfs":
            _make_target(target, True)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            if not writable:
                _remount_readonly(target)
        elif kind == "hide-file":
            if os.path.lexists(target):
                _mount(empty_file, target, None, MS_BIND)
                _remount_readonly(target)
        elif kind == "unmount":
            _check(_libc.umount2(target.encode(), MNT_DETACH), f"unmount {target}")
            with contextlib.suppress(OSError):
                os.rmdir(target)
        elif kind == "symlink":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(source, target)
        else:
            raise ConfineError(errno.EINVAL, f"unknown mount kind {kind!r}")
    remove = list(remove)
    for target in remove:
        _check(_libc.umount2(target.encode(), MNT_DETACH), f"unmount {target}")
        # Not only unmounted: under gVisor the root's own view of a mount point can still
        # show what was mounted there. Removed where the root allows, else covered.
        with contextlib.suppress(OSError):
            os.removedirs(target)
    for target in [*remove, *cover]:
        if os.path.lexists(target):  # an empty read-only tmpfs over it
            _mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "mode=0555")  # fmt: skip
    root = os.statvfs("/").f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | sum(ms for st, ms in _KEEP_FLAGS.items()
                                                   if root & st)  # fmt: skip
    _mount(None, "/", None, flags)  # the root alone: the workspace below stays writable


def output_inside(path: str) -> None:
    """Standard input from /dev/null, output to ``path`` (a file of the sandbox's own):
    under gVisor a kernel can open the descriptors of the sandbox's other processes through
    /proc (its CAP_DAC_OVERRIDE passes the Sentry's checks there), and the ones they
    started with are the member's log on the host."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def become(uid: int, gid: int) -> None:
    """Become ``uid``:``gid`` (from the sandbox's root) keeping the capabilities held, for
    :func:`restrict` to choose from: a kernel of a pooled gVisor sandbox, which must be the
    sandbox uid (an exec would lose them: gVisor has no ambient capabilities)."""
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keep capabilities")
    mount_stage.become(uid, gid)
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "keep capabilities")
    with open("/proc/self/status") as status:  # the change of uid emptied the effective set
        permitted = next(int(line.split()[1], 16) for line in status
                         if line.startswith("CapPrm:"))  # fmt: skip
    _capset(permitted, 0)


def _capset(mask: int, inheritable: int) -> None:
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF,
                                 inheritable & 0xFFFFFFFF, mask >> 32, mask >> 32,
                                 inheritable >> 32)  # fmt: skip
    _check(_libc.syscall(_SYS_CAPSET, header, data), "capset")


def restrict(keep: Iterable[str] = (), seccomp_filter: Any = None) -> None:
    """Every capability but ``keep`` (names such as CAP_DAC_OVERRIDE) gone from the
    effective, permitted, inheritable, ambient and (where allowed) bounding sets; then
    the seccomp filter. no_new_privs is already set (bubblewrap), so exec regains none."""
    kept = {CAPABILITIES[name] for name in keep if name}
    for cap in range(64):
        if cap in kept:
            continue
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability; EPERM (no CAP_SETPCAP) leaves the bound as is
    mask = sum(1 << cap for cap in kept)
    _capset(mask, mask)
    if not kept:
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if seccomp_filter is not None:
        seccomp_filter.load()
