"""What a kernel must not change in a writable workspace: files the host runs later.

A workspace is the user's directory, and the kernel writes it. Some files in
it are code the host runs without asking: shell start-up files and other dot
files at the top of a home directory, the commands in ``~/bin``, Jupyter's and
IPython's configuration, the server's own Python environment, git's
configuration and hooks. A kernel that could write them would run code on the
host the next time the user logs in, types a command, starts Jupyter or types
``git status``. So, wherever a bind exposes them:

* every home directory (the server user's and every account's) keeps its top
  level as it is: no entry can be created, replaced or removed there (its
  non-dot files and directories but ``bin`` stay writable, each bound on its
  own), and its dot entries are hidden;
* the directories commands are looked up in are read-only where they really
  are (a link's destination): each home's ``bin`` and ``.local/bin``
  (:data:`PATH_DIRS`, which login shells put on PATH) and every directory on the
  server's own PATH. Read-only rather than hidden: the kernel still reads and
  runs what is there, as it did, and hiding would protect no more. One inside a
  hidden directory (``~/.local/bin``) stays hidden. A missing ``bin`` or
  ``.local/bin`` cannot be created: the top of the home is read-only, and
  ``.local`` hidden. A missing directory of the server's PATH, or a link's
  missing destination, can be made where its parent is writable: protecting
  it would mean making it on the host first, as root, following the user's
  links;
* Jupyter's and IPython's config, data and runtime directories are hidden
  (made first if missing, so a kernel cannot create one), and the server's
  Python environment is read-only;
* every existing repository at any depth (``.git``, ``.hg``, ``.svn``, and bare
  git repositories) is read-only;
* paths matching the ``hidden_paths`` patterns are hidden.

A repository the kernel creates is not covered here: with the server as root
its files belong to the sandbox uid, and git refuses to run a repository that
belongs to someone else ("dubious ownership"), see :mod:`.identity`.
"""

from __future__ import annotations

import glob
import os
import pwd
import time
from collections.abc import Iterable

from .pyenv import is_within
from .spec import Mount, MountKind

#: Homes that are not homes.
_NOT_HOMES = {"/", "/nonexistent", "/dev/null"}
#: A workspace walk slower than this is logged (it runs at every kernel start).
SLOW_WALK = 1.0
#: Where in a home shell start-up looks up commands, when the directory exists: Debian's
#: and Ubuntu's ~/.profile, Fedora's and RHEL's ~/.bashrc, openSUSE's /etc/profile (which
#: adds ``bin/$CPU`` inside these); ``.local/bin`` is also systemd's and pip's place for
#: a user's programs.
PATH_DIRS = ("bin", ".local/bin")


def homes() -> list[str]:
    """Every account's home directory that exists, and the server user's."""
    found = {os.path.realpath(os.path.expanduser("~"))}
    for account in pwd.getpwall():
        home = account.pw_dir
        if home and home not in _NOT_HOMES and os.path.isdir(home):
            found.add(os.path.realpath(home))
    return sorted(found - _NOT_HOMES)


def mounts(
    binds: list[Mount],
    *,
    hidden_patterns: Iterable[str],
    jupyter_dirs: Iterable[str],
    readonly_dirs: Iterable[str],
    repository_names: Iterable[str],
    python_binds: list[str],
    log: object = None,
) -> list[Mount]:
    """The mounts that protect what ``binds`` expose, in the order to apply them."""
    writable = [b for b in binds if b.writable and b.source]
    for directory in jupyter_dirs:
        _make_if_exposed(directory, writable)
    hidden = [*hidden_patterns, *jupyter_dirs]
    found: list[Mount] = []
    readonly_dirs = list(readonly_dirs)
    on_path = _server_path()
    for home in homes():
        if any(is_within(home, p) for p in python_binds):
            continue
        on_path += [os.path.join(home, d) for d in PATH_DIRS]
        found += _home_top_level(home, binds, writable, {os.path.realpath(d) for d in on_path})
        hidden.append(os.path.join(home, ".*"))
    found += _hidden(binds, hidden, python_binds)
    read_only = [m for d in readonly_dirs for m in _read_only(d, writable)]
    read_only += _commands(on_path, writable, [*python_binds, *readonly_dirs], found)
    found += read_only
    # The walk for repositories enters neither what is hidden nor what is read-only
    # already, with nothing writable mounted inside it (a project's own virtualenv is
    # most of many workspaces): a repository there needs no mount of its own.
    writable_targets = [m.target for m in [*binds, *found] if m.writable]
    settled = {
        t for t in [*python_binds, *(m.target for m in read_only)]
        if not any(is_within(w, t) for w in writable_targets)
    }  # fmt: skip
    unwalked = {m.target for m in found if m.kind is not MountKind.BIND} | settled
    found += _repositories(writable, set(repository_names), unwalked, log)
    return found


def _target(bind: Mount, host: str) -> str:
    assert bind.source is not None
    return bind.target + host[len(bind.source) :]


def _exposing(host: str, binds: list[Mount]) -> list[Mount]:
    return [b for b in binds if b.source is not None and is_within(host, b.source)]


def _read_only(host: str, binds: list[Mount]) -> list[Mount]:
    """``host`` read-only wherever ``binds`` show it."""
    if not os.path.exists(host):
        return []
    host = os.path.realpath(host)
    return [Mount(_target(b, host), source=host) for b in _exposing(host, binds)]


def _make_if_exposed(directory: str, writable: list[Mount]) -> None:
    """A missing Jupyter/IPython directory a kernel could create: make it (empty) first."""
    if not os.path.lexists(directory) and _exposing(os.path.abspath(directory), writable):
        os.makedirs(directory, mode=0o700, exist_ok=True)


def _server_path() -> list[str]:
    """The absolute directories on the server's PATH (what it and the processes it starts,
    a terminal's shell among them, look up commands in)."""
    return [d for d in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(d)]


def _commands(
    on_path: list[str], writable: list[Mount], settled: list[str], found: list[Mount]
) -> list[Mount]:
    """The directories ``on_path`` read-only where a writable bind shows them, where they
    really are; not those already read-only as part of a directory in ``settled``, nor
    those inside what ``found`` hides (a read-only bind there would show them)."""
    hidden = [m.target for m in found if m.kind is not MountKind.BIND]
    mounts: dict[str, Mount] = {}
    for directory in on_path:
        if any(is_within(os.path.realpath(directory), s) for s in settled):
            continue
        for mount in _read_only(directory, writable):
            if not any(is_within(mount.target, h) for h in hidden):
                mounts.setdefault(mount.target, mount)
    return list(mounts.values())


def _home_top_level(
    home: str, binds: list[Mount], writable: list[Mount], on_path: set[str]
) -> list[Mount]:
    """The top of ``home`` read-only where a writable bind shows it (a bind of a directory
    inside the home does not: its top is out of sight); its non-dot entries rebound
    writable, but for those ``on_path`` (:func:`_commands` protects them)."""
    found: list[Mount] = []
    for bind in writable:
        assert bind.source is not None
        if not is_within(home, bind.source):
            continue
        found.append(Mount(_target(bind, home), source=home))
        try:
            entries = list(os.scandir(home))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.is_symlink() or entry.path in on_path:
                continue
            if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
                found.append(Mount(_target(bind, entry.path), source=entry.path, writable=True))
    return found


def _hidden(binds: list[Mount], patterns: list[str], python_binds: list[str]) -> list[Mount]:
    """Mounts that hide host paths matching ``patterns`` wherever a bind exposes them."""
    hidden: list[Mount] = []
    for pattern in patterns:
        for match in glob.glob(os.path.expanduser(pattern)):
            host = os.path.realpath(match)
            # A Python environment under a hidden path stays visible, read-only.
            if any(is_within(host, p) for p in python_binds):
                continue
            for bind in binds:
                if bind.source is None or not is_within(host, bind.source) or host == bind.source:
                    continue
                kind = MountKind.TMPFS if os.path.isdir(host) else MountKind.HIDE_FILE
                hidden.append(Mount(_target(bind, host), kind, writable=kind is MountKind.TMPFS))
    return hidden


#: What a bare git repository's directory holds (see :func:`_is_bare_repository`).
_BARE = frozenset({"HEAD", "objects", "refs"})


def _is_bare_repository(path: str) -> bool:
    return (
        os.path.isfile(os.path.join(path, "HEAD"))
        and os.path.isdir(os.path.join(path, "objects"))
        and os.path.isdir(os.path.join(path, "refs"))
    )


def _repositories(
    writable: list[Mount], names: set[str], unwalked: set[str], log: object
) -> list[Mount]:
    """Every existing repository (by name, or a bare git one) at any depth, read-only.

    This walk runs at every kernel start and grows with the workspace, so it reads each
    directory once (``scandir``) and asks nothing more of an entry than its listing
    says, but for a candidate repository: a directory holding HEAD, objects and refs, a
    regular file by a repository's name. Symbolic links are not followed (a link by a
    repository's name to a directory is protected where it leads); the directories
    shown at the ``unwalked`` targets are not entered.
    """
    found: list[Mount] = []
    for bind in writable:
        assert bind.source is not None
        started = time.monotonic()
        seen = 0
        skip = {bind.source + t[len(bind.target) :] for t in unwalked if is_within(t, bind.target)}
        pending = [bind.source]
        while pending:
            top = pending.pop()
            try:
                with os.scandir(top) as listing:
                    entries = list(listing)
            except OSError:
                continue
            seen += len(entries)
            if (top != bind.source and _BARE.issubset(e.name for e in entries)
                    and _is_bare_repository(top)):  # fmt: skip
                found.append(Mount(_target(bind, top), source=top))
                continue
            below = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # through a link, as git would
                    if entry.name not in names:
                        if is_dir and not entry.is_symlink() and entry.path not in skip:
                            below.append(entry.path)
                    elif entry.is_symlink():
                        # A link to the repository (``repo``'s layout): the directory it
                        # leads to, where the workspace shows it (a bind through a link
                        # is refused); elsewhere the kernel does not see it.
                        real = os.path.realpath(entry.path)
                        if is_dir and is_within(real, bind.source):
                            found.append(Mount(_target(bind, real), source=real))
                    elif is_dir or entry.is_file(follow_symlinks=False):
                        found.append(Mount(_target(bind, entry.path), source=entry.path))
                except OSError:
                    continue
            pending += reversed(below)  # depth first, in listing order
        took = time.monotonic() - started
        if took > SLOW_WALK and log is not None:
            log.warning(  # type: ignore[attr-defined]
                "finding repositories in %s took %.1fs (%d entries): a smaller workspace "
                "starts kernels faster", bind.source, took, seen,
            )  # fmt: skip
    return found
