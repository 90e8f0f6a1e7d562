"""Inside a pooled local sandbox: bind the kernel's workspace late, then give up the power to.

A pooled sandbox starts before anyone knows which notebook it will serve. Its
agent sees a *stage* (the directory all workspaces lie under, e.g. the
server's root directory) and holds CAP_SYS_ADMIN in the sandbox's own user
namespace, nothing more. When a kernel is assigned, :func:`apply_plan` binds
exactly that kernel's workspace at its host path (with the dot files hidden
and ``.git`` read-only, as a cold sandbox has them), unmounts the stage and
makes the root read-only. :func:`drop_privileges` runs in every kernel the
agent forks, before any of its code: no capabilities, the seccomp filter.

Mount calls go through libc (``ctypes``): the standard library has no mount(2).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
from typing import Any

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2
#: statvfs flags that a bind remount must keep (the kernel refuses to clear locked ones).
_KEEP_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC}
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(platform.machine(), 126)

_libc = ctypes.CDLL(None, use_errno=True)


class ConfineError(OSError):
    """A mount of the plan failed; the sandbox must not be used."""


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
    kept = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    flags |= sum(ms for st, ms in _KEEP_FLAGS.items() if kept & st)
    _mount(None, target, None, flags)


def _make_target(target: str, directory: bool) -> None:
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if directory:
        os.mkdir(target)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))


def apply_plan(plan: list[dict[str, Any]], stage: str | None, empty_file: str) -> None:
    """Carry out ``plan`` (mounts as ``{kind, target, source, writable}``), then seal.

    ``bind`` sources are paths in this sandbox (under the stage); ``hide-file``
    binds ``empty_file`` over its target; ``tmpfs`` and ``symlink`` as in
    :class:`~sandbox_provisioner.spec.Mount`; ``unmount`` removes a mount of the
    pooled sandbox the kernel must not have. Parents come before children.
    """
    for entry in plan:
        kind, target = entry["kind"], entry["target"]
        source, writable = entry.get("source"), bool(entry.get("writable"))
        if kind == "bind":
            _make_target(target, os.path.isdir(source))
            _mount(source, target, None, MS_BIND | MS_REC)
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
    if stage:
        _check(_libc.umount2(stage.encode(), MNT_DETACH), f"unmount {stage}")
        with contextlib.suppress(OSError):  # not even the empty mount point stays
            os.removedirs(stage)
    _remount_readonly("/")


def drop_privileges(seccomp_filter: Any = None) -> None:
    """No capabilities (effective, permitted, inheritable, bounding where allowed), then the
    seccomp filter. no_new_privs is already set (bubblewrap), so exec cannot regain any."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability; EPERM (no CAP_SETPCAP) leaves the bound as is
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.syscall(_SYS_CAPSET, header, data), "capset")
    if seccomp_filter is not None:
        seccomp_filter.load()
