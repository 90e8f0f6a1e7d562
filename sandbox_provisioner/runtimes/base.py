"""The runtime interface: how the provisioner starts and controls one sandbox.

A :class:`SandboxRuntime` is a kind of isolation (bubblewrap, gVisor, later a
Kubernetes Sandbox). It says whether it can run here (:meth:`availability`)
and turns a :class:`~sandbox_provisioner.spec.SandboxSpec` into a running
:class:`Sandbox`. The provisioner knows only these two classes; each runtime
lives in a module of its own and is found through the entry-point group
``sandbox_provisioner.runtimes``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

from traitlets.config import LoggingConfigurable

from ..agent.kernel import BANNER_ARG, HISTORY_ARG
from ..errors import SandboxError
from ..limits import FreezeError, freeze_cgroup, is_frozen, thaw_cgroup
from ..spec import SandboxSpec


class RuntimeUnavailable(SandboxError):
    """The requested runtime cannot run on this machine; the message says what to install."""


@dataclass(frozen=True)
class Availability:
    """Whether a runtime works here, and if not, why and what to do about it."""

    available: bool
    #: What was found (binary and version) or what is missing.
    detail: str
    #: What to install or change to make it available.
    remedy: str = ""

    def __str__(self) -> str:
        text = self.detail
        if not self.available and self.remedy:
            text += f"; {self.remedy}"
        return text


class _Meta(abc.ABCMeta, type(LoggingConfigurable)):  # type: ignore[misc]
    """ABCs and traitlets together, as jupyter_client's provisioner base does."""


def _ipykernel(cmd: list[str]) -> bool:
    return any("ipykernel" in part for part in cmd)


def banner_arguments(cmd: list[str], label: str) -> list[str]:
    """For IPython kernels: ipykernel arguments that name the sandbox in the banner."""
    return [f"{BANNER_ARG}Sandboxed kernel: {label}\n"] if _ipykernel(cmd) else []


def history_arguments(cmd: list[str], env: dict[str, str]) -> list[str]:
    """For an IPython kernel whose IPython directory is in the sandbox's private ``/tmp``
    (HOME=/tmp and no IPYTHONDIR): its history in memory. The session's history is the
    same; only the database file, which the sandbox's end throws away, is not written
    (in gVisor, where file system calls are costly, about 0.07 s of a cold start)."""
    if not _ipykernel(cmd) or env.get("HOME") != "/tmp" or "IPYTHONDIR" in env:
        return []
    return [HISTORY_ARG]


class Sandbox(abc.ABC):
    """One running sandbox holding one kernel process."""

    #: True when :meth:`restart_kernel` starts a new kernel in this same sandbox.
    restarts_in_place: ClassVar[bool] = False

    @abc.abstractmethod
    async def poll(self) -> int | None:
        """None while the kernel runs, else its exit code."""

    @abc.abstractmethod
    async def wait(self) -> int | None:
        """Wait until the kernel has exited; its exit code."""

    @abc.abstractmethod
    async def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel process inside the sandbox."""

    @abc.abstractmethod
    async def terminate(self) -> None:
        """Ask the kernel to exit (SIGTERM to the kernel process)."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """End every process of the sandbox now."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Make sure nothing of the sandbox is left: processes, mounts, cgroups, state."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """JSON-able facts from which :meth:`SandboxRuntime.reattach` rebuilds this handle."""

    async def restart_kernel(self, spec: SandboxSpec) -> None:
        """Replace the kernel by a new one in this sandbox (only if ``restarts_in_place``)."""
        raise NotImplementedError

    def connection_info(self) -> dict[str, Any] | None:
        """Connection info the sandbox chose (remote sandboxes: ip, ports, key); None when
        the provisioner's own connection file applies."""
        return None

    async def output_tail(self) -> str | None:
        """The kernel's last output, where the runtime keeps it elsewhere than the kernel log."""
        return None

    def host_pids(self) -> list[int]:
        """Host process ids of the sandbox's processes, where the runtime can know them."""
        return []

    # -- freezing: every process stopped where it is, memory kept -------------------------
    def freezer(self) -> str | None:
        """The cgroup (its path below each hierarchy) that holds every process of this
        sandbox and has a freezer; None where it has none (no cgroups, not on this host)."""
        return None

    async def freeze(self) -> None:
        """Stop every process of the sandbox where it is: no CPU, memory kept, sockets open.
        Nothing of it runs until :meth:`thaw` (signals wait too). Raises
        :class:`~sandbox_provisioner.limits.FreezeError` if it cannot, leaving it running."""
        group = self.freezer()
        if group is None:
            raise FreezeError("this sandbox cannot be frozen: it has no cgroup of its own "
                              "(it runs without limits, or not as root)")  # fmt: skip
        await freeze_cgroup(group)

    def thaw(self) -> None:
        """Let a frozen sandbox run on (nothing if it is not frozen)."""
        if (group := self.freezer()) is not None:
            thaw_cgroup(group)

    def frozen(self) -> bool:
        return (group := self.freezer()) is not None and is_frozen(group)


class SandboxRuntime(LoggingConfigurable, metaclass=_Meta):
    """A kind of isolation. Subclasses set ``name`` and ``strength`` and implement the rest."""

    #: The name kernelspecs use (``"runtime": "gvisor"``).
    name: ClassVar[str]
    #: A short human description, for listings and ``jupyter sandbox doctor``.
    description: ClassVar[str]
    #: Isolation strength; ``auto`` picks the strongest available runtime.
    strength: ClassVar[int]
    #: Whether sandboxes run on this machine (host mounts, IPC sockets in the kernel's
    #: directory). Remote ones (a cluster) get everything through their kernel agent and
    #: give their own connection info; ``auto`` never picks them.
    local: ClassVar[bool] = True
    #: Whether a started sandbox can still take its workspace (bound by its kernel agent),
    #: which local warm pools need.
    pooling: ClassVar[bool] = False
    #: Whether a sandbox's main process can inherit a listening socket (a pooled agent's).
    #: If not, the agent makes its socket in a directory bound for it alone, hidden once
    #: its kernel is assigned (see sandbox_provisioner.pool).
    inherits_sockets: ClassVar[bool] = True
    #: Whether files show their host device and inode numbers inside its sandboxes, so a
    #: pooled agent can check that it binds the directory the server planned.
    host_inodes: ClassVar[bool] = True

    @staticmethod
    def cgroup_name(kernel_id: str) -> str:
        """The name of the cgroup (below ``jupyter-sandbox/``) of the sandbox this runtime
        starts for ``kernel_id``, where it makes one."""
        return kernel_id

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether this runtime can start sandboxes here (cheap: no sandbox is started)."""

    @abc.abstractmethod
    async def launch(self, spec: SandboxSpec) -> Sandbox:
        """Start the kernel described by ``spec`` in a new sandbox."""

    @abc.abstractmethod
    def reattach(self, info: dict[str, Any]) -> Sandbox:
        """A handle on a sandbox started earlier, possibly by another process."""

    def require(self) -> None:
        """Raise :class:`RuntimeUnavailable`, with what to install, unless available."""
        found = self.availability()
        if not found.available:
            raise RuntimeUnavailable(
                f"the {self.name} sandbox runtime is not available: {found}. "
                "The kernel was not started: it never runs unsandboxed."
            )
