"""This server's own corner of the state root, and the sweep of corners left by dead servers.

Several Jupyter servers of one uid share a state root (``/tmp/jupyter-sandbox-<uid>``):
a Hub's users, a test run beside a lab. What a server keeps for its own sake,
its warm pools and gVisor templates, lives in a directory of its own,
``<state root>/servers/<id>``, which the server holds an exclusive ``flock`` on
for as long as it runs. Nothing another server does touches it: templates of the
same layout in two servers are two templates, and a server's exit removes its
own directory only (and ``servers/`` if that leaves it empty).

A server that died without cleaning up (SIGKILL, a crash) leaves its directory
unlocked. :func:`sweep` removes those, and only those: a directory whose lock
another process holds is alive, whatever its age. The cgroups its sandboxes had
go too (:func:`~.limits.sweep_cgroups`: only groups no process is in), and its
kernels' directories in the state root (:func:`sweep_kernel_dirs`: only those no
kernel listens in).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from .limits import sweep_cgroups

_LOCK = ".lock"
#: Per state root: (directory, the open lock file) of this process.
_MINE: dict[str, tuple[Path, int]] = {}


def directory(state_root: str | Path) -> Path:
    """This process's directory under ``state_root`` (made, locked and swept for on first use)."""
    key = str(state_root)
    found = _MINE.get(key)
    if found is not None and found[0].is_dir():
        return found[0]
    servers = Path(state_root) / "servers"
    for attempt in range(5):  # another server's exit may remove an empty servers/ meanwhile
        try:
            servers.mkdir(mode=0o711, parents=True, exist_ok=True)
            sweep(servers)
            mine = servers / uuid.uuid4().hex[:12]
            mine.mkdir(mode=0o711)
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
    swept = sweep_cgroups()  # dead servers' sandboxes' cgroups (root only: else none)
    kernels = sweep_kernel_dirs(Path(state_root))
    if swept or kernels:
        logging.getLogger(__name__).info("removed %d cgroups and %d kernel directories left "
                                         "by sandboxes that are gone", len(swept),
                                         len(kernels))  # fmt: skip
    fd = os.open(mine / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _MINE[key] = (mine, fd)
    return mine


def sweep(servers: Path) -> list[Path]:
    """Remove the directories of servers that are gone (their lock is free); the removed."""
    removed = []
    for entry in servers.iterdir():
        if not entry.is_dir() or any(entry == d for d, _ in _MINE.values()):
            continue
        try:
            fd = os.open(entry / _LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # being made right now, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its server runs
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


#: A kernel's directory with no kernel listening in it, untouched for this long, is left
#: over: a starting kernel binds its sockets within its launch timeout (seconds, not this).
STALE_KERNEL_DIR_AGE = 600.0


def sweep_kernel_dirs(state_root: Path, older_than: float = STALE_KERNEL_DIR_AGE) -> list[Path]:
    """Remove kernels' directories in ``state_root`` that a dead server left (SIGKILL): no
    socket in their ``ipc`` directory accepts a connection, and none changed for
    ``older_than`` seconds. A running kernel of any server listens on its sockets, so it
    keeps its directory; the removed."""
    removed = []
    now = time.time()
    for entry in state_root.iterdir() if state_root.is_dir() else ():
        if entry.name == "servers" or not (entry / "ipc").is_dir():
            continue
        try:
            ipc = entry / "ipc"
            if now - max(entry.stat().st_mtime, ipc.stat().st_mtime) < older_than:
                continue
            if any(_listening(sock) for sock in ipc.iterdir() if sock.is_socket()):
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@atexit.register
def _remove_mine() -> None:
    for mine, fd in list(_MINE.values()):
        shutil.rmtree(mine, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):  # the last server out: servers/ goes too
            mine.parent.rmdir()
    _MINE.clear()
