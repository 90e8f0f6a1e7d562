"""Files and trees that a sandbox or a user wrote, handled by a privileged process: never
through a link, never more than a bound.

The Hub and its service run as root and touch what less privileged code wrote: a
preparation's repository, environment and log, a user's home. A path lookup there can
meet a symbolic link the writer planted, or a directory they swap for one between a check
and its use, and land on any file of the host: a root-only secret read into a server's
environment, a chown of ``/etc/shadow``. So here

* nothing is opened by a path that can follow a link: each component is opened beneath
  its parent's descriptor with ``O_NOFOLLOW`` (what ``openat2``'s ``RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS`` does, one component at a time: no ``..``, no absolute path);
* what is read is checked on the descriptor (``fstat``): a regular file, of a bounded
  size; opened ``O_NONBLOCK`` so that a named pipe cannot hold the reader;
* trees are walked by descriptor, depth bounded, and a directory that changed between
  its listing and its opening is refused, not followed;
* file data is copied sparsely: holes stay holes (``SEEK_DATA``/``SEEK_HOLE``).

Standard library only: :mod:`.home_copy` (a short-lived child of the Hub) imports it.
(``sandbox_provisioner.runtimes.mount_stage`` resolves its mounts alike; it runs before
anything is importable, so it keeps its own.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

#: Directories beneath directories, at most: deeper is refused (a walk, a copy, a limit).
MAX_DEPTH = 128
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


class Refused(OSError):
    """What was found is not what may be used (a link, a special file, too large, too deep,
    changed while walked); the message says what."""

    def __str__(self) -> str:
        return str(self.strerror)


def open_dir(path: str | os.PathLike[str]) -> int:
    """A directory the caller trusts the path of (its own), opened; its last component must
    not be a link."""
    return os.open(path, _DIR)


def open_beneath(dir_fd: int, path: str, flags: int = os.O_RDONLY) -> int:
    """``path`` (relative, plain) opened beneath ``dir_fd`` with ``flags``, through no link
    and never above ``dir_fd``. :class:`Refused` for a link or a path that is not plain;
    FileNotFoundError when something is missing."""
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Refused(errno.EINVAL, f"{path!r} is not a plain relative path")
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            opened.append(os.open(part, _DIR, dir_fd=opened[-1] if opened else dir_fd))
        parent = opened[-1] if opened else dir_fd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(exc.errno, f"{path} is reached through a link (or is one)") from None
        if exc.errno == errno.ENOTDIR:
            raise Refused(exc.errno, f"{path}: on its way, a file where a directory should "
                          "be") from None  # fmt: skip
        raise
    finally:
        for fd in opened:
            os.close(fd)


def read_file(dir_fd: int, path: str, limit: int) -> bytes:
    """The content of the regular file ``path`` beneath ``dir_fd``, at most ``limit`` bytes;
    :class:`Refused` for a link, a special file or a larger file."""
    fd = open_beneath(dir_fd, path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused(errno.EINVAL, f"{path} is not a regular file")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
        if len(data) > limit:
            raise Refused(errno.EFBIG, f"{path} is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    """One entry of a walk: its parent's descriptor (open while the entry is the walk's),
    its name there, its ``lstat`` and its depth (0: in the top directory)."""

    parent: int
    name: str
    stat: os.stat_result
    depth: int


def walk(top: int, *, strict: bool = True, max_depth: int = MAX_DEPTH) -> Iterator[Entry]:
    """Every entry below the directory open at ``top``, a directory before what it holds,
    never through a link. ``strict``: an entry that vanishes or changes while walked is
    :class:`Refused` (a tree at rest); else skipped (a tree a sandbox is writing). A tree
    deeper than ``max_depth`` is refused either way."""
    stack: list[tuple[int, Iterator[str]]] = []
    try:
        _enter(stack, os.dup(top))
        while stack:
            fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if strict:
                    raise Refused(errno.ENOENT, f"{name} went while it was walked") from None
                continue
            yield Entry(fd, name, st, len(stack) - 1)
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) > max_depth:
                raise Refused(errno.ELOOP, f"directories nest deeper than {max_depth} levels")
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except OSError:
                if strict:
                    raise Refused(errno.ESTALE, f"{name} changed while it was walked") from None
                continue
            if not os.path.samestat(st, os.fstat(child)):
                os.close(child)
                if strict:
                    raise Refused(errno.ESTALE, f"{name} changed while it was walked")
                continue
            _enter(stack, child)
    finally:
        for fd, _ in stack:
            os.close(fd)


def _enter(stack: list[tuple[int, Iterator[str]]], fd: int) -> None:
    """Walk into the directory open at ``fd`` (the stack owns it from now on)."""
    stack.append((fd, iter(())))
    stack[-1] = (fd, iter(os.listdir(fd)))


@dataclass
class Usage:
    """What a tree holds: apparent bytes (``st_size``: a sparse file counts its length, a
    file linked twice counts twice, as a copy makes it) and entries (inodes a copy makes)."""

    bytes: int = 0
    entries: int = 0


def usage(top: int, *, max_bytes: int = 0, max_entries: int = 0, strict: bool = False) -> Usage:
    """What the tree at ``top`` holds; the count stops once past ``max_bytes`` or
    ``max_entries`` (when given: enough to know it is too much)."""
    found = Usage()
    for entry in walk(top, strict=strict):
        found.entries += 1
        if stat.S_ISREG(entry.stat.st_mode):
            found.bytes += entry.stat.st_size
        if (max_bytes and found.bytes > max_bytes) or (max_entries and found.entries > max_entries):
            break
    return found


def copy_data(src: int, dst: int, size: int) -> None:
    """``size`` bytes of ``src`` into ``dst`` (both regular files, ``dst`` empty), holes left
    holes: only the data segments are copied (in the kernel where it can)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end
                break
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        _copy_range(src, dst, start, end)
        offset = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    position = start
    while position < end:
        want = min(end - position, 64 * _CHUNK)
        try:
            done = os.copy_file_range(src, dst, want, position, position)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = _copy_by_hand(src, dst, position, min(want, _CHUNK))
        if done == 0:  # the source is shorter than it said
            return
        position += done


def _copy_by_hand(src: int, dst: int, position: int, count: int) -> int:
    data = os.pread(src, count, position)
    view = memoryview(data)
    while view:
        written = os.pwrite(dst, view, position + len(data) - len(view))
        view = view[written:]
    return len(data)


class LogTail:
    """A log that less privileged code writes, read as it grows: the file found at ``path``
    when it first appears (a regular file, opened beneath its directory, not through a
    link), whatever the name becomes later; ``limit`` bytes in all, in lines of at most
    ``line_limit``."""

    def __init__(self, path: os.PathLike[str], limit: int, line_limit: int = 4096):
        path = os.fspath(path)
        self._dir: int | None = open_dir(os.path.dirname(path))
        self._name = os.path.basename(path)
        self.limit, self.line_limit = limit, line_limit
        self._fd: int | None = None
        self._partial, self._read, self._cut = b"", 0, False

    def lines(self, final: bool = False) -> list[str]:
        """The lines written since the last call (``final``: and the last, unfinished one);
        :class:`Refused` if the log is a link or no regular file."""
        if self._fd is None and not self._open():
            return []
        lines: list[bytes] = []
        while self._read < self.limit and (chunk := os.read(self._fd, min(
                1 << 16, self.limit - self._read))):  # fmt: skip
            self._read += len(chunk)
            *done, self._partial = (self._partial + chunk).split(b"\n")
            lines += done
            while len(self._partial) > self.line_limit:
                lines.append(self._partial[: self.line_limit])
                self._partial = self._partial[self.line_limit :]
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        text = [line.decode(errors="replace").rstrip() for line in lines]
        if self._read >= self.limit and not self._cut:
            self._cut = True
            text.append(f"(the log goes on past {self.limit >> 20} MiB: the rest is not shown)")
        return text

    def _open(self) -> bool:
        assert self._dir is not None, "closed"
        try:
            fd = open_beneath(self._dir, self._name, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Refused(errno.EINVAL, f"{self._name} is not a regular file")
        self._fd = fd
        return True

    def close(self) -> None:
        for fd in (self._fd, self._dir):
            if fd is not None:
                os.close(fd)
        self._fd = self._dir = None


def remove_beneath(dir_fd: int, name: str) -> None:
    """Remove ``name`` beneath ``dir_fd`` (a tree: entry by entry, by descriptor)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
