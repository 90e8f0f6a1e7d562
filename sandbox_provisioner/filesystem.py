"""The filesystem a sandboxed kernel sees, computed as a list of mounts.

Closed by default: the sandbox root is empty and read-only. In it appear
the system (``/usr`` and its usual links, read-only), a short allowlist of
``/etc`` files, the kernel's Python environment (read-only), a private
``/tmp``, the per-kernel socket directory and connection file, and the
workspace. Host paths are bound at the same path inside the sandbox, so
paths a user sees in the notebook server mean the same thing in the kernel.

Inside a workspace that holds a home directory, the home's dot files
(credentials, shell start-up files, Jupyter's own runtime files with
server tokens) are hidden, and version-control metadata is read-only:
otherwise a sandboxed kernel could plant code that the host runs later.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

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

#: Hidden inside any bound directory: credentials, start-up files, Jupyter's state.
DEFAULT_HIDDEN_PATHS = ("~/.*",)

#: Bound read-only inside a writable workspace (relative to the workspace).
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


def system_mounts(etc_allowlist: tuple[str, ...] = DEFAULT_ETC_ALLOWLIST) -> list[Mount]:
    mounts = [Mount("/usr", source="/usr")]
    for path in _SYSTEM_LINKS:
        if os.path.islink(path):
            mounts.append(Mount(path, MountKind.SYMLINK, source=os.readlink(path)))
        elif os.path.isdir(path):
            mounts.append(Mount(path, source=path))
    mounts += [Mount(p, source=p) for p in etc_allowlist if os.path.exists(p)]
    mounts.append(Mount("/tmp", MountKind.TMPFS, writable=True))
    return mounts


def synthetic_etc(etc_dir: Path, hostname: str, uid: int, gid: int) -> list[Mount]:
    """Write passwd, group, hosts and hostname for the sandbox and return their mounts.

    The sandbox never sees the host's account database, only its own user.
    """
    etc_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "passwd": f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{gid}:sandbox:/tmp:/bin/sh\n"
        if uid
        else "root:x:0:0:root:/tmp:/bin/sh\n",
        "group": f"root:x:0:\nsandbox:x:{gid}:\n" if gid else "root:x:0:\n",
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
    etc_allowlist: tuple[str, ...] = DEFAULT_ETC_ALLOWLIST,
    hidden_paths: tuple[str, ...] = DEFAULT_HIDDEN_PATHS,
    workspace_readonly: tuple[str, ...] = DEFAULT_WORKSPACE_READONLY,
) -> tuple[Mount, ...]:
    """The sandbox's mounts, parents before children, later entries on top."""
    mounts = system_mounts(etc_allowlist) + etc_mounts
    python_binds = [p for p in minimal_cover(python_paths) if not is_within(p, "/usr")]
    user_binds: list[Mount] = []
    if workspace is not None:
        user_binds.append(Mount(workspace, source=workspace, writable=workspace_writable))
    elif scratch_dir is not None:
        user_binds.append(Mount(SCRATCH_TARGET, source=scratch_dir, writable=True))
    user_binds += [Mount(e.target, source=e.source, writable=e.writable) for e in extra]

    mounts += user_binds
    mounts += _hidden(user_binds, hidden_paths, python_binds)
    if workspace is not None and workspace_writable:
        for rel in workspace_readonly:
            path = os.path.join(workspace, rel)
            if os.path.exists(path):
                mounts.append(Mount(path, source=path))
    mounts += [Mount(p, source=p) for p in python_binds]
    if ipc_dir is not None:
        mounts.append(Mount(ipc_dir, source=ipc_dir, writable=True))
    if connection_file is not None:
        mounts.append(Mount(connection_file, source=connection_file))
    # Stable sort: a mount is applied after every mount of a shallower target.
    return tuple(sorted(mounts, key=lambda m: m.depth))


def _hidden(binds: list[Mount], patterns: tuple[str, ...], python_binds: list[str]) -> list[Mount]:
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
                target = bind.target + host[len(bind.source) :]
                kind = MountKind.TMPFS if os.path.isdir(host) else MountKind.HIDE_FILE
                hidden.append(Mount(target, kind, writable=kind is MountKind.TMPFS))
    return hidden
