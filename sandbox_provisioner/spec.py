"""What one sandboxed kernel is: its command, what it may see, and its limits.

The provisioner builds a :class:`SandboxSpec` from configuration and the kernel
launch; every runtime (bubblewrap, gVisor, later Kubernetes) receives the same
object and translates it to its own mechanism. Nothing reaches a kernel unless
it is listed here, so this module is the single place to read the isolation
contract from.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .identity import SandboxIdentity


class NetworkMode(enum.StrEnum):
    """How the sandbox reaches the network."""

    #: A private network namespace with loopback only (the default).
    NONE = "none"
    #: The host's network stack (opt-in; the kernel can reach what the host reaches).
    HOST = "host"


class WorkspaceMode(enum.StrEnum):
    """Which host directory the kernel works in."""

    #: The notebook's own directory, read-write (the default).
    NOTEBOOK = "notebook"
    #: The notebook's own directory, read-only.
    NOTEBOOK_READONLY = "notebook-readonly"
    #: The server's whole root directory, read-write.
    ROOT = "root"
    #: No host directory: an empty private scratch directory.
    SCRATCH = "scratch"


class MountKind(enum.StrEnum):
    BIND = "bind"
    TMPFS = "tmpfs"
    SYMLINK = "symlink"
    #: Hide a host file behind an empty read-only file.
    HIDE_FILE = "hide-file"


@dataclass(frozen=True)
class Mount:
    """One entry of the sandbox's filesystem, at ``target`` inside it.

    For ``BIND`` the host ``source`` appears at ``target``; for ``SYMLINK``
    ``source`` is the link's text; ``TMPFS`` and ``HIDE_FILE`` need no source.
    """

    target: str
    kind: MountKind = MountKind.BIND
    source: str | None = None
    writable: bool = False

    @property
    def depth(self) -> int:
        return len(Path(self.target).parts)


@dataclass(frozen=True)
class ResourceLimits:
    """Per-sandbox limits; ``None`` means no limit of that kind."""

    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.memory_bytes, self.cpus, self.pids))


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a runtime needs to start one kernel in one sandbox."""

    #: The kernel id; runtimes derive their own names from it.
    kernel_id: str
    #: The kernel command, already formatted (connection file path filled in).
    argv: list[str]
    #: The complete environment of the kernel (already filtered by the allowlist).
    env: dict[str, str]
    #: The kernel's working directory inside the sandbox.
    cwd: str
    #: The filesystem, ordered so that parents come before children.
    mounts: tuple[Mount, ...]
    network: NetworkMode = NetworkMode.NONE
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    #: Host directory private to this kernel, where the runtime keeps its files.
    state_dir: Path = Path()
    #: Host file that receives the kernel's stdout and stderr.
    log_path: Path = Path()
    #: The hostname the kernel sees.
    hostname: str = "sandbox"
    #: Who the kernel is on the host (a dedicated uid when the server is root); None: the
    #: server's own uid, in a user namespace of the sandbox.
    identity: SandboxIdentity | None = None
    #: Descriptors the sandbox's main process inherits (a pooled agent's listening socket).
    keep_fds: tuple[int, ...] = ()
    #: The sandbox connects to Unix sockets the host made in its bound directories (a Hub
    #: user's server reaches the Hub API so); it may always create its own (IPC sockets).
    host_sockets: bool = False
    #: gVisor: the main process starts as the sandbox's root with only CAP_SETUID and
    #: CAP_SETGID and becomes ``identity``'s uid itself before it runs anything of a
    #: user's (a template that serves every user, see sandbox_spawner.server_template).
    switches_user: bool = False
    #: The main process is the kernel agent of a pooled sandbox, started before its kernel
    #: is known: it keeps CAP_SYS_ADMIN inside the sandbox (never outside) to bind the
    #: kernel's workspace when one is assigned, and each kernel it forks drops every
    #: capability and loads the seccomp filter before running anything.
    agent: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for a process that launches the sandbox on another's behalf (the
        Hub's per-server supervisor); :meth:`from_dict` reads it back."""
        data = dataclasses.asdict(self)
        data["mounts"] = [{**m, "kind": m["kind"].value} for m in data["mounts"]]
        data["network"] = self.network.value
        data["state_dir"], data["log_path"] = str(self.state_dir), str(self.log_path)
        data["keep_fds"] = []  # descriptors do not travel
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxSpec:
        data = dict(data)
        data["mounts"] = tuple(Mount(**{**m, "kind": MountKind(m["kind"])}) for m in data["mounts"])
        data["network"] = NetworkMode(data["network"])
        data["limits"] = ResourceLimits(**data["limits"])
        data["state_dir"], data["log_path"] = Path(data["state_dir"]), Path(data["log_path"])
        data["identity"] = SandboxIdentity(**data["identity"]) if data.get("identity") else None
        data["keep_fds"] = ()
        return cls(**data)
