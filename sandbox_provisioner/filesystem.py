"""The filesystem a sandboxed kernel sees, computed as a list of mounts.

Closed by default: the sandbox root is empty and read-only. In it appear
the system (``/usr`` and its usual links, read-only), a short allowlist of
``/etc`` files, the kernel's Python environment (read-only), a private
``/tmp``, the per-kernel socket directory and connection file, and the
workspace. Host paths are bound at the same path inside the sandbox, so
paths a user sees in the notebook server mean the same thing in the kernel.

What the host runs later stays out of the kernel's reach wherever a bind
exposes it (a home's dot files and top level, Jupyter's and IPython's
directories, the server's Python, every repository): :mod:`.protected`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import protected
from .pyenv import is_within, minimal_cover
from .spec import Mount, MountKind

#: Host paths under /etc that Python, locales, TLS and fonts need; nothing secret.
DEFAULT_ETC_ALLOWLIST = (
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/debian_version",
    "/etc/fonts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/matplotlibrc",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/etc/pki",
    "/etc/python3",
    "/etc/ssl",
    "/etc/timezone",
)

#: Inside the /etc allowlist, but never shown: private keys (0710 root:ssl-cert on Debian).
ETC_HIDDEN = ("/etc/ssl/private",)

#: Hidden inside any bound directory: credentials, start-up files, Jupyter's state.
DEFAULT_HIDDEN_PATHS = ("~/.*",)

#: Read-only inside a writable workspace: names at any depth (repositories), or paths
#: relative to the workspace (with a slash).
DEFAULT_WORKSPACE_READONLY = (".git", ".hg", ".svn")

#: Where the workspace appears when it is a private scratch directory.
SCRATCH_TARGET = "/workspace"

_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclass(frozen=True)
class ExtraMount:
    """An operator-configured bind, parsed from ``HOST[:SANDBOX][:ro|rw]``."""

    source: str
    target: str
    writable: bool

    @classmethod
    def parse(cls, text: str) -> ExtraMount:
        parts = text.split(":")
        mode = "ro"
        if parts[-1] in ("ro", "rw"):
            mode = parts.pop()
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"invalid mount {text!r}: expected HOST[:SANDBOX][:ro|rw]")
        source = os.path.realpath(os.path.expanduser(parts[0]))
        target = parts[1] if len(parts) == 2 else source
        if not os.path.isabs(target):
            raise ValueError(f"invalid mount {text!r}: the sandbox path must be absolute")
        if not os.path.exists(source):
            raise ValueError(f"invalid mount {text!r}: {source} does not exist")
        return cls(source, os.path.normpath(target), mode == "rw")


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to ``uid``:``gid``; symbolic links themselves,
    never what they point at."""
    for path in (root, *root.rglob("*")):
        with contextlib.suppress(OSError):
            os.lchown(path, uid, gid)


def system_mounts(etc_allowlist: tuple[str, ...] = DEFAULT_ETC_ALLOWLIST) -> list[Mount]:
    mounts = [Mount("/usr", source="/usr")]
    for path in _SYSTEM_LINKS:
        if os.path.islink(path):
            mounts.append(Mount(path, MountKind.SYMLINK, source=os.readlink(path)))
        elif os.path.isdir(path):
            mounts.append(Mount(path, source=path))
    mounts += [Mount(p, source=p) for p in etc_allowlist if os.path.exists(p)]
    mounts += [Mount(p, MountKind.TMPFS) for p in ETC_HIDDEN
               if os.path.isdir(p) and any(is_within(p, e) for e in etc_allowlist)]  # fmt: skip
    mounts.append(Mount("/tmp", MountKind.TMPFS, writable=True))
    return mounts


def synthetic_etc(
    etc_dir: Path,
    hostname: str,
    uid: int,
    gid: int,
    user: str = "sandbox",
    home: str = "/tmp",
    shell: str = "/bin/sh",
) -> list[Mount]:
    """Write passwd, group, hosts and hostname for the sandbox and return their mounts.

    The sandbox never sees the host's account database, only its own user.
    """
    etc_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "passwd": f"root:x:0:0:root:/root:/bin/sh\n{user}:x:{uid}:{gid}:{user}:{home}:{shell}\n"
        if uid
        else f"root:x:0:0:root:{home}:{shell}\n",
        "group": f"root:x:0:\n{user}:x:{gid}:\n" if gid else "root:x:0:\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n",
        "hostname": f"{hostname}\n",
    }
    mounts = []
    for name, text in files.items():
        (etc_dir / name).write_text(text)
        mounts.append(Mount(f"/etc/{name}", source=str(etc_dir / name)))
    return mounts


def build_mounts(
    *,
    python_paths: list[str],
    workspace: str | None,
    workspace_writable: bool,
    scratch_dir: str | None,
    ipc_dir: str | None,
    connection_file: str | None,
    etc_mounts: list[Mount],
    extra: list[ExtraMount] = (),  # type: ignore[assignment]
    agent_only: list[ExtraMount] = (),  # type: ignore[assignment]
    etc_allowlist: tuple[str, ...] = DEFAULT_ETC_ALLOWLIST,
    hidden_paths: tuple[str, ...] = DEFAULT_HIDDEN_PATHS,
    workspace_readonly: tuple[str, ...] = DEFAULT_WORKSPACE_READONLY,
    jupyter_dirs: tuple[str, ...] = (),
    log: object = None,
) -> tuple[Mount, ...]:
    """The sandbox's mounts, parents before children, later entries on top.

    ``jupyter_dirs`` (Jupyter's and IPython's) are hidden wherever a bind shows them;
    ``agent_only`` binds (a pooled sandbox's stage) get no hidden or read-only paths."""
    mounts = system_mounts(etc_allowlist) + etc_mounts
    python_binds = [p for p in minimal_cover(python_paths) if not is_within(p, "/usr")]
    user_binds: list[Mount] = []
    if workspace is not None:
        user_binds.append(Mount(workspace, source=workspace, writable=workspace_writable))
    elif scratch_dir is not None:
        user_binds.append(Mount(SCRATCH_TARGET, source=scratch_dir, writable=True))
    user_binds += [Mount(e.target, source=e.source, writable=e.writable) for e in extra]

    mounts += user_binds
    names = tuple(n for n in workspace_readonly if "/" not in n)
    paths = [os.path.join(workspace, p) for p in workspace_readonly
             if "/" in p and workspace is not None]  # fmt: skip
    mounts += protected.mounts(
        user_binds,
        hidden_patterns=hidden_paths,
        jupyter_dirs=jupyter_dirs,
        readonly_dirs=[*paths, sys.prefix, sys.base_prefix],  # and the server's Python
        repository_names=names,
        python_binds=python_binds,
        log=log,
    )
    # A pooled sandbox's stage, seen by its agent only: what it binds from it must be the
    # real files (the kernel's own hidden and read-only mounts are made at their targets).
    mounts += [Mount(e.target, source=e.source, writable=e.writable) for e in agent_only]
    mounts += [Mount(p, source=p) for p in python_binds]
    if ipc_dir is not None:
        mounts.append(Mount(ipc_dir, source=ipc_dir, writable=True))
    if connection_file is not None:
        mounts.append(Mount(connection_file, source=connection_file))
    # A mount hides any earlier one at the same target: keep the last (runsc restores
    # mounts by destination, and wants one per destination).
    last = {m.target: i for i, m in enumerate(mounts)}
    mounts = [m for i, m in enumerate(mounts) if last[m.target] == i]
    # Stable sort: a mount is applied after every mount of a shallower target.
    return tuple(sorted(mounts, key=lambda m: m.depth))
