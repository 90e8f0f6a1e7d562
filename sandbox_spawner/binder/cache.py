"""The prepared commits' cache, bounded: the least recently launched go first, never one a
server uses.

Each launch marks its prepared commit used (the record's modification time). After a
new preparation, while the cache holds more than its bound, the least recently
launched commit is removed, unless a running or starting server uses it (its
environment is bound into that server) or a launch holds its lock. A hibernated
server whose commit went is told, when it resumes, to launch its link again, which
prepares the commit anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from .prepare import PREPARED, Prepared
from .seal import disk_usage


def touch(prepared: Prepared) -> None:
    """Mark a prepared commit as launched now."""
    with contextlib.suppress(OSError):
        os.utime(prepared.path / PREPARED)


def in_use(users: list[dict[str, Any]], cache_root: Path) -> set[Path]:
    """The prepared commits the Hub's running or starting servers use (the users' models,
    with their servers' ``user_options``)."""
    used = set()
    for user in users:
        for server in (user.get("servers") or {}).values():
            options = (server.get("user_options") or {}).get("binder")
            if isinstance(options, dict) and (server.get("ready") or server.get("pending")):
                used.add(cache_root / str(options.get("repo")) / str(options.get("commit")))
    return used


def evict(cache_root: Path, max_bytes: int, keep: set[Path]) -> list[Path]:
    """Remove least recently launched commits until the cache holds ``max_bytes`` at most;
    the removed."""
    entries = []
    for record in cache_root.glob(f"*/*/{PREPARED}"):
        entry = record.parent
        with contextlib.suppress(OSError):
            entries.append((record.stat().st_mtime, entry, disk_usage(entry)))
    total = sum(size for _, _, size in entries)
    removed: list[Path] = []
    for _, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if entry in keep or not _remove(entry):
            continue
        total -= size
        removed.append(entry)
    return removed


def _remove(entry: Path) -> bool:
    """Remove a prepared commit unless a launch holds its lock; out of sight first (one
    rename), so that no launch finds it half removed."""
    lock = entry.parent / f"{entry.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        trash = entry.parent.parent / ".work" / f"evicted-{entry.name[:12]}-{secrets.token_hex(4)}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
