"""Run as root just before a local runtime: stage its host directories, then become it.

A runtime binds host directories by path, and a path can change between the
plan that resolved it and the mount: another kernel writing the parent could
swap in a symlink and have a different directory bound. So, in a mount
namespace of its own that the host never sees, this helper opens each source
refusing any symlink, checks it is the file the server saw (device and inode),
clones it (``open_tree``) and attaches the clone at a *stage* path. The runtime
then binds the stages, which nothing else can change. Stages are in the
sandbox's own directory, or, for a runtime that sets up as the sandbox uid
(bubblewrap), in a private /tmp that uid can reach wherever the server keeps
its files.

For a bubblewrap kernel of a root server it also makes the kernel's user
namespace, id-maps the clones (``mount_setattr(MOUNT_ATTR_IDMAP)``) and then
becomes the sandbox uid before it runs bubblewrap, see
:mod:`sandbox_provisioner.identity`: the kernel runs as the sandbox uid; the
server's files appear, through the stages only, as the alias, over which the
kernel's CAP_DAC_OVERRIDE in its own user namespace applies; what it creates is
stored as the sandbox uid. Every other host file it sees is root's and
unmapped there: no capability applies to it. The user namespace belongs to the
sandbox uid, so bubblewrap enters it without changing uid, and what it sets
before the kernel starts (the parent-death signal that ends the sandbox with
its monitor) is not cleared by a change of credentials.

Usage: ``python -I -S mount_stage.py PLAN -- COMMAND...`` (standard library
only). PLAN is JSON: ``stages`` ([source, stage, readonly, [dev, ino]]) and,
for bubblewrap as root, ``private_tmp``, ``user`` ([uid, gid]), ``userns`` and
``idmap`` ({"uid": map, "gid": map}). ``{userns}`` in COMMAND becomes the user
namespace's descriptor. Nothing here outlives the sandbox: the namespaces end
with it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys

_libc = ctypes.CDLL(None, use_errno=True)

# The same numbers on x86_64 and aarch64 (the mount API of Linux 5.2 onwards).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_OPENAT2, _SYS_MOUNT_SETATTR = 428, 429, 437, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, 0o2000000
_AT_EMPTY_PATH, _AT_RECURSIVE, _AT_FDCWD = 0x1000, 0x8000, -100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_RESOLVE_NO_SYMLINKS = 0x04
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_SLAVE = 0x2, 0x4, 0x4000, 0x80000
#: Exit status when the sandbox cannot be prepared (the message is on stderr).
FAILED = 125


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]  # fmt: skip


class StageError(OSError):
    pass


def _syscall(number: int, *args: object, what: str) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise StageError(err, f"{what}: {os.strerror(err)}")
    return result


def user_namespace(uid_map: str, gid_map: str, owner: list[int] | None = None) -> int:
    """A descriptor of a new user namespace with these maps (root may write any map),
    created by ``owner`` ([uid, gid]; default root), who holds every capability in it."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only holds the namespace until its maps are written
        os.close(ready_r)
        os.close(hold_w)
        if owner is not None:
            become(*owner)
        os.write(ready_w, b"\0" if _libc.unshare(_CLONE_NEWUSER) == 0 else b"\1")
        os.read(hold_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"\0":
            raise StageError(errno.EPERM, "cannot create the kernel's user namespace")
        for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def become(uid: int, gid: int) -> None:
    """Drop every group and privilege: from now on this process is ``uid``:``gid``."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def open_exactly(path: str, expect: list[int] | None) -> int:
    """An O_PATH descriptor of ``path``: no symlink on the way, the device and inode
    the server saw. Anything else is a swap, refused."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, _AT_FDCWD, path.encode(), ctypes.byref(how),
                       ctypes.sizeof(how))  # fmt: skip
    err = ctypes.get_errno() if fd < 0 else 0
    if err == errno.ENOSYS:  # no openat2 (gVisor): one component at a time
        fd, err = _open_walking(path)
    if fd < 0:
        if err == errno.ELOOP:
            raise StageError(err, f"{path} is now reached through a symlink: refused")
        raise StageError(err, f"{path}: {os.strerror(err)}")
    st = os.fstat(fd)
    if expect is not None and [st.st_dev, st.st_ino] != list(expect):
        os.close(fd)
        raise StageError(errno.ESTALE, f"{path} was replaced after the plan was made (device "
                         f"and inode {st.st_dev}:{st.st_ino}, not {expect[0]}:{expect[1]}): "
                         "refused")  # fmt: skip
    return fd


def _open_walking(path: str) -> tuple[int, int]:
    """``path`` opened O_PATH one component at a time, refusing any symlink (what
    RESOLVE_NO_SYMLINKS does where there is no openat2): (descriptor, 0) or (-1, errno)."""
    if not os.path.isabs(path) or ".." in path.split("/"):
        return -1, errno.EINVAL
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in (p for p in path.split("/") if p not in ("", ".")):
            child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                return -1, errno.ELOOP
    except OSError as exc:
        os.close(fd)
        return -1, exc.errno or errno.EIO
    return fd, 0


def _clone(fd: int, recursive: bool, source: str) -> int:
    flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH
    return _syscall(_SYS_OPEN_TREE, fd, b"", flags | (_AT_RECURSIVE if recursive else 0),
                    what=f"clone {source}")  # fmt: skip


def _set_attributes(tree: int, attrs: int, idmap_fd: int, recursive: bool, source: str) -> None:
    attr = _MountAttr(attrs, 0, 0, max(idmap_fd, 0))
    flags = _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
    _syscall(_SYS_MOUNT_SETATTR, tree, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr),
             what=f"mount attributes of {source} (its filesystem may not support id-mapped "
                  "mounts)" if idmap_fd >= 0 else f"mount attributes of {source}")  # fmt: skip


def clone(source: str, readonly: bool, expect: list[int] | None, idmap_fd: int = -1) -> int:
    """A detached clone of ``source`` (id-mapped with ``idmap_fd`` if given), with
    everything mounted below it, read-only below too when ``readonly``."""
    attrs = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | (_MOUNT_ATTR_RDONLY if readonly else 0)
    if idmap_fd >= 0:
        attrs |= _MOUNT_ATTR_IDMAP
    fd = open_exactly(source, expect)
    try:
        tree = _clone(fd, True, source)
        try:
            _set_attributes(tree, attrs, idmap_fd, True, source)
        except StageError as exc:
            os.close(tree)
            if exc.errno != errno.EINVAL or idmap_fd < 0:
                raise
            # A mount below it cannot be id-mapped (proc, a network filesystem): stage the
            # directory alone; what was mounted below it stays out of the sandbox.
            tree = _clone(fd, False, source)
            _set_attributes(tree, attrs, idmap_fd, False, source)
        return tree
    finally:
        os.close(fd)


def attach(tree: int, target: str, source: str) -> None:
    """Make the stage point ``target`` (a directory or a file, as the clone is) and
    attach the clone there."""
    if stat.S_ISDIR(os.fstat(tree).st_mode):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o444))
    try:
        _syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH,
                 what=f"attach {source}")  # fmt: skip
    finally:
        os.close(tree)


def prepare(plan: dict) -> int | None:
    """Stage everything in a new mount namespace; the user namespace's descriptor, if any.

    Every source is cloned first; then, with ``private_tmp``, a fresh /tmp (what the
    sandbox uid can reach whatever the server's directories are) takes the stages."""
    userns = idmap = None
    if plan.get("userns"):
        userns = user_namespace(plan["userns"]["uid"], plan["userns"]["gid"], plan["user"])
    if plan.get("idmap"):
        idmap = user_namespace(plan["idmap"]["uid"], plan["idmap"]["gid"])
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise StageError(ctypes.get_errno(), "cannot make a private mount namespace")
    if _libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
        raise StageError(ctypes.get_errno(), "cannot keep mounts from the host")
    trees = [(clone(source, readonly, expect, -1 if idmap is None else idmap), target, source)
             for source, target, readonly, expect in plan["stages"]]  # fmt: skip
    if idmap is not None:
        os.close(idmap)
    flags = _MS_NOSUID | _MS_NODEV
    if plan.get("private_tmp") and _libc.mount(b"tmpfs", b"/tmp", b"tmpfs", flags, b"mode=1777"):
        raise StageError(ctypes.get_errno(), "cannot mount a private /tmp")
    for tree, target, source in trees:
        attach(tree, target, source)
    return userns


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: mount_stage.py PLAN -- COMMAND...")
    try:
        plan = json.loads(argv[0])
        userns = prepare(plan)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"jupyter-sandbox: cannot prepare the sandbox: {exc}\n")
        sys.exit(FAILED)
    command = argv[2:]
    if userns is not None:
        os.set_inheritable(userns, True)
        command = [a.replace("{userns}", str(userns)) for a in command]
    if plan.get("user"):
        become(*plan["user"])
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
