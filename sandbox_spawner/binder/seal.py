"""What a preparation leaves, taken in by root: measured, read as input, sealed.

The preparation's sandbox (or pod) writes the repository's checkout and the environment as
an unprivileged uid; the service (root) then measures them, reads the environment's
``.site``, and makes both readable by every user before they become a prepared commit.
All of it by descriptor (:mod:`.untrusted`): the writer may have left links, pipes,
files linked twice, directories nested to no end, sparse files of any length.

* :func:`over_limits`: apparent sizes (a sparse file counts its length) and entries
  (inodes), against the preparation's limits; while it runs and once it has ended;
* :func:`read_site`: ``.site`` is a short relative path of the environment, else refused;
* :func:`seal`: every directory and file readable (and searchable) by all, no set-id
  bit, no write but the owner's; special files removed (they mean nothing outside the
  preparation). A file linked from outside the tree is refused: its mode is not this
  tree's to change. (A sandbox cannot make one: its writable directories are mounts of
  their own, and a link across mounts fails; the check does not rely on it.)
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import stat
from pathlib import Path

from . import untrusted

#: Bytes ``.site`` may have (a path of the environment's, relative).
SITE_LIMIT = 4096
_SITE = re.compile(r"[^\x00-\x1f\x7f-\x9f:]+")
#: What the preparation wrote and servers use (beside the record, the service's own).
KEPT = ("repo", "env")


class Unusable(ValueError):
    """What the preparation left cannot be used; the message says why."""


def over_limits(work: Path, max_bytes: int, max_entries: int, *, strict: bool) -> str | None:
    """What the preparation in ``work`` has gone past (its repository and environment
    together), None when it is within ``max_bytes`` and ``max_entries`` (0: no limit).
    ``strict``: the tree is at rest (else a running sandbox's: what vanishes meanwhile is
    skipped)."""
    used = untrusted.Usage()
    for sub in KEPT:
        try:
            fd = untrusted.open_dir(work / sub)
            try:  # (+ 1: what is left of a bound may be 0, which is no bound to usage())
                found = untrusted.usage(fd, max_bytes=max_bytes and max_bytes - used.bytes + 1,
                                        max_entries=max_entries and max_entries - used.entries + 1,
                                        strict=strict)  # fmt: skip
            finally:
                os.close(fd)
        except untrusted.Refused as exc:
            return str(exc)
        used.bytes += found.bytes
        used.entries += found.entries
        if max_bytes and used.bytes > max_bytes:
            return (f"more than {max_bytes >> 20} MiB of disk (apparent sizes: a sparse file "
                    "counts its length)")  # fmt: skip
        if max_entries and used.entries > max_entries:
            return f"more than {max_entries} files and directories"
    return None


def disk_usage(root: Path) -> int:
    """Apparent bytes of the files below ``root`` (a prepared commit, at rest)."""
    fd = untrusted.open_dir(root)
    try:
        return untrusted.usage(fd, strict=False).bytes
    finally:
        os.close(fd)


def valid_site(text: object) -> bool:
    """Whether ``text`` can be where an environment's packages are: a relative path inside
    it (no ``..``), with no ``:`` (it goes into ``PYTHONPATH``) and no control character."""
    return (isinstance(text, str) and bool(_SITE.fullmatch(text)) and not text.startswith("/")
            and ".." not in text.split("/"))  # fmt: skip


def read_site(env: Path, name: str, default: str) -> str:
    """The environment's ``name`` (``.site``, written in the sandbox), checked;
    ``default`` when there is none. :class:`Unusable` for a link, a special or large file,
    or content that is no relative path of the environment."""
    fd = untrusted.open_dir(env)
    try:
        raw = untrusted.read_file(fd, name, SITE_LIMIT)
    except FileNotFoundError:
        return default
    except untrusted.Refused as exc:
        raise Unusable(f"the environment's {name} is refused: {exc}") from None
    finally:
        os.close(fd)
    text = raw.decode("utf-8", "replace").strip()
    if not valid_site(text):
        raise Unusable(f"the environment's {name} names no directory of it ({text[:80]!r}): "
                       "refused")  # fmt: skip
    return text


def seal(work: Path) -> None:
    """Keep what servers use (the repository, the environment, the record), readable by
    every user (read-only in their servers: it is bound so); :class:`Unusable` for a file
    linked from outside."""
    for sub in ("state", "plan", "etc", "log"):  # the service's (a pod's log: its own)
        shutil.rmtree(work / sub, ignore_errors=True)
    top = untrusted.open_dir(work)
    try:
        _chmod(top, 0o755)
        for sub in KEPT:
            fd = untrusted.open_dir(work / sub)
            try:
                _chmod(fd, 0o755)
                _seal_tree(fd, sub)
            finally:
                os.close(fd)
    finally:
        os.close(top)


def _seal_tree(top: int, where: str) -> None:
    links: collections.Counter[tuple[int, int]] = collections.Counter()
    for entry in untrusted.walk(top):
        if stat.S_ISREG(entry.stat.st_mode) and entry.stat.st_nlink > 1:
            links[(entry.stat.st_dev, entry.stat.st_ino)] += 1
    for entry in untrusted.walk(top):
        mode = entry.stat.st_mode
        if stat.S_ISLNK(mode):
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            os.unlink(entry.name, dir_fd=entry.parent)  # a pipe, a socket, a device
            continue
        linked = entry.stat.st_nlink
        if stat.S_ISREG(mode) and linked > 1 and linked > links[(entry.stat.st_dev,
                                                                   entry.stat.st_ino)]:  # fmt: skip
            raise Unusable(f"{where}: {entry.name} is also linked from outside the prepared "
                           "tree: refused")  # fmt: skip
        wanted = _readable(mode)
        if wanted == stat.S_IMODE(mode) or os.geteuid() not in (0, entry.stat.st_uid):
            continue  # as it should be; or another uid's (a pod's), not ours to change
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(entry.name, flags | (os.O_DIRECTORY if stat.S_ISDIR(mode) else 0),
                     dir_fd=entry.parent)  # fmt: skip
        try:
            if not os.path.samestat(entry.stat, os.fstat(fd)):
                raise Unusable(f"{where}: {entry.name} changed while it was sealed")
            _chmod(fd, wanted)
        finally:
            os.close(fd)


def _readable(mode: int) -> int:
    """A sealed entry's mode: the owner's bits, read (and search, or execute where the
    owner may) for all; no write but the owner's, no set-id or sticky bit."""
    owner = stat.S_IMODE(mode) & 0o700
    if stat.S_ISDIR(mode) or owner & 0o100:
        return owner | 0o555
    return owner | 0o444


def _chmod(fd: int, mode: int) -> None:
    with contextlib.suppress(PermissionError):  # a pod's uid made it: not root's to change
        os.fchmod(fd, mode)
