"""A user's copy of a prepared commit, made in their home by the user's uid: a child of the
Hub (:meth:`.server.BinderServer.copy_for`).

    python -m sandbox_spawner.binder.home_copy SOURCE HOME KEY UID GID

The home is the user's: their running server may change it at any moment, and the Hub is
root. A copy made there by root through paths went wherever the user's links led (a
directory of the user's inside ``/root``; with a directory swapped for a link mid-copy,
the repository's files written as root into any directory). So this process opens the
prepared commit and the home, then becomes the user (no supplementary group, no
capability) before it touches anything in the home: what it writes is the user's, where
the user may write, within the user's disk quota, and no chown or chmod of root's can be
led to another file (a link, a hard link). Even so, it reaches nothing in the home
through a link: everything is made beneath descriptors (:mod:`.untrusted`), and nothing
there is replaced:

* ``~/binder/<KEY>``, a directory, is the user's copy, with their changes: kept;
* a link, a file or anything else in its place is refused (the user moves it away);
* else the commit is copied into ``~/binder/.<KEY>.<random>``, then renamed to ``<KEY>``
  only if that name is still free: no launch sees half a copy. What an interrupted copy
  left is removed first.

Regular files are copied sparsely (holes stay holes), links as links; pipes, sockets and
devices are not copied. It prints ``made`` or ``kept``; else it exits 1 with the reason
on stderr, which the launch page shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import sys

from . import untrusted

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1


def become(uid: int, gid: int) -> None:
    """Drop every group and privilege: from now on this process is ``uid``:``gid`` (a Hub
    that is not root runs as the users' uid already). As ``mount_stage.become``, which
    cannot be imported here without loading the provisioner (0.4 s of every copy)."""
    if os.getuid() == uid and os.geteuid() == uid:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def copy(source: int, home: int, key: str) -> str:
    """The user's copy of the tree at ``source`` as ``binder/<key>`` in ``home`` (both open):
    ``kept`` or ``made``; :class:`~.untrusted.Refused` for what is in its way."""
    binder = _binder_dir(home)
    try:
        try:
            found = os.stat(key, dir_fd=binder, follow_symlinks=False)
        except FileNotFoundError:
            found = None
        if found is not None:
            if stat.S_ISDIR(found.st_mode):
                return "kept"
            what = "a link" if stat.S_ISLNK(found.st_mode) else "not a directory"
            raise untrusted.Refused(errno.EEXIST, f"~/binder/{key} is {what}, not your copy "
                                    "of the repository: move it away to launch it")  # fmt: skip
        for name in os.listdir(binder):  # what a copy that was interrupted left
            if name.startswith(f".{key}."):
                untrusted.remove_beneath(binder, name)
        staging = f".{key}.{secrets.token_hex(4)}"
        os.mkdir(staging, 0o700, dir_fd=binder)
        try:
            made = os.open(staging, _DIR, dir_fd=binder)
            try:
                _copy_tree(source, made)
                os.fchmod(made, (stat.S_IMODE(os.fstat(source).st_mode) & 0o777) | 0o700)
            finally:
                os.close(made)
            if not _rename_noreplace(binder, staging, key):
                untrusted.remove_beneath(binder, staging)
                return "kept"  # a copy made meanwhile (the user's, or another launch's)
        except BaseException:
            untrusted.remove_beneath(binder, staging)
            raise
        return "made"
    finally:
        os.close(binder)


def _binder_dir(home: int) -> int:
    """``~/binder``, made if missing, opened without following a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir("binder", 0o755, dir_fd=home)
    try:
        return os.open("binder", _DIR, dir_fd=home)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    raise untrusted.Refused(errno.ELOOP, "~/binder is a link or a file, not a directory of "
                            "your home: move it away to launch repositories")


def _copy_tree(source: int, target: int) -> None:
    """Everything below ``source`` into ``target`` (an empty directory), by descriptor."""
    made = [target]  # the directory made for each level of the walk
    where: list[str] = []  # and its name
    path = "."
    try:
        for entry in untrusted.walk(source):
            while len(made) > entry.depth + 1:
                os.close(made.pop())
                where.pop()
            path, mode = "/".join([*where, entry.name]), entry.stat.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(entry.name, 0o700, dir_fd=made[-1])
                made.append(os.open(entry.name, _DIR, dir_fd=made[-1]))
                where.append(entry.name)
                os.fchmod(made[-1], (stat.S_IMODE(mode) & 0o777) | 0o700)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(entry.name, dir_fd=entry.parent), entry.name,
                           dir_fd=made[-1])  # fmt: skip
            elif stat.S_ISREG(mode):
                _copy_file(entry, made[-1])
    except OSError as exc:
        detail = exc.strerror if isinstance(exc, untrusted.Refused) else os.strerror(exc.errno)
        raise untrusted.Refused(exc.errno or errno.EIO, f"{path}: {detail}") from None
    finally:
        for fd in made[1:]:
            os.close(fd)


def _copy_file(entry: untrusted.Entry, target: int) -> None:
    src = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                  dir_fd=entry.parent)  # fmt: skip
    try:
        st = os.fstat(src)
        if not os.path.samestat(st, entry.stat):
            raise untrusted.Refused(errno.ESTALE, "changed while it was copied")
        dst = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=target)  # fmt: skip
        try:
            untrusted.copy_data(src, dst, st.st_size)
            os.fchmod(dst, (stat.S_IMODE(st.st_mode) & 0o777) | 0o200)  # the user's to change
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _rename_noreplace(directory: int, old: str, new: str) -> bool:
    """Rename ``old`` to ``new`` in ``directory`` unless ``new`` exists (then False)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        if libc.renameat2(directory, old.encode(), directory, new.encode(),
                          _RENAME_NOREPLACE) == 0:  # fmt: skip
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    try:  # no renameat2 here: the check and the rename are two steps (in the user's own home)
        os.stat(new, dir_fd=directory, follow_symlinks=False)
        return False
    except FileNotFoundError:
        os.rename(old, new, src_dir_fd=directory, dst_dir_fd=directory)
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        sys.stderr.write("usage: python -m sandbox_spawner.binder.home_copy SOURCE HOME KEY "
                         "UID GID\n")  # fmt: skip
        return 2
    source_path, home_path, key, uid, gid = argv
    try:
        # As the Hub: the cache may be closed to users above the prepared commit (the
        # commit itself is readable by all), and the homes' directory is root's.
        source = untrusted.open_dir(source_path)
        home = untrusted.open_dir(home_path)
        become(int(uid), int(gid))
        os.umask(0o022)
        print(copy(source, home, key))
    except OSError as exc:
        sys.stderr.write(f"{exc.strerror if isinstance(exc, untrusted.Refused) else exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
