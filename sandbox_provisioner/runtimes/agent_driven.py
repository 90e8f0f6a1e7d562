"""What sandboxes driven through a kernel agent share (a claimed Sandbox, a local pool member).

The provisioner sees a :class:`~.base.Sandbox`; underneath, every operation is
a request to the sandbox's kernel agent (:mod:`sandbox_provisioner.agent`):
start (and restart in place), signal, poll, stop. Subclasses say how to reach
the agent, what a start carries besides the kernel's arguments and
environment, and what cleaning up means (delete a claim, end a local sandbox).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING, Any, ClassVar

from ..agent.kernel import BANNER_ARG
from ..spec import SandboxSpec
from .base import Sandbox, banner_arguments

if TYPE_CHECKING:
    from ..agent.client import AgentClient


class AgentUnreachable(ConnectionError):
    """The sandbox's agent cannot be reached: the sandbox is gone."""


class AgentDrivenSandbox(Sandbox):
    restarts_in_place: ClassVar[bool] = True

    def __init__(self, log: Any):
        self.log = log
        self.agent: AgentClient | None = None
        self.session: bytes | None = None
        self.connection: dict[str, Any] | None = None
        #: Whether the first kernel found the sandbox ready (a warm start).
        self.warm = False
        self.starts = 0

    # -- what subclasses say ----------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> AgentClient:
        """A new connection to the agent, resuming this sandbox's session."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The sandbox, for the banner and messages ("kubernetes, pool python-gvisor")."""

    def start_fields(self, spec: SandboxSpec) -> dict[str, Any]:
        """More fields of the start request (a local pool: mounts, IPC endpoint)."""
        return {}

    # -- the agent --------------------------------------------------------------------------
    async def _agent(self) -> AgentClient:
        if self.agent is None:
            self.agent = await self.connect()
        return self.agent

    async def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        """A request, reconnecting once if the connection broke."""
        for attempt in (1, 2):
            try:
                return await (await self._agent()).request(op, **fields)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                self.drop_agent()
                if attempt == 2:
                    raise AgentUnreachable(f"the kernel agent is unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    def drop_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    # -- the Sandbox interface --------------------------------------------------------------
    async def start_kernel(self, spec: SandboxSpec) -> None:
        how = "restarted in place" if self.starts else f"{'warm' if self.warm else 'cold'} start"
        args = [a for a in kernel_args(spec.argv) if not a.startswith(BANNER_ARG)]
        args += banner_arguments(spec.argv, f"{self.describe()} ({how})")
        reply = await self._request(
            "start", args=args, env=spec.env, timeout=60, **self.start_fields(spec)
        )
        self.starts += 1
        self.connection = dict(reply["connection"])

    async def restart_kernel(self, spec: SandboxSpec) -> None:
        await self._request("stop", grace=0)
        await self.start_kernel(spec)

    def connection_info(self) -> dict[str, Any] | None:
        if self.connection is None or self.session is None:
            return None
        from ..agent.protocol import kernel_key

        # bytes, as jupyter_client's own connection info has it
        return {**self.connection, "key": kernel_key(self.session).encode()}

    async def poll(self) -> int | None:
        try:
            return (await self._request("poll"))["exit_code"]
        except (ConnectionError, TimeoutError) as exc:
            self.log.warning("%s: %s", self.describe(), exc)
            return -1

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return code

    async def send_signal(self, signum: int) -> None:
        from ..agent.client import AgentError

        # No kernel running, or the sandbox is gone: nothing to signal (poll says which).
        with contextlib.suppress(AgentError, ConnectionError, TimeoutError):
            await self._request("signal", signum=signum)

    async def terminate(self) -> None:
        await self.send_signal(signal.SIGTERM)

    async def kill(self) -> None:
        """End the kernel now; the sandbox stays until cleanup (a restart reuses it)."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self._request("stop", grace=0)

    async def output_tail(self) -> str:
        try:
            return str((await self._request("log"))["log"])
        except Exception:
            return "(the kernel agent is unreachable)"


def kernel_args(argv: list[str]) -> list[str]:
    """The arguments after ``-f {connection_file}``: the agent runs ipykernel itself."""
    if "-f" not in argv or not any("ipykernel" in a for a in argv[:3]):
        raise ValueError(
            "sandboxes with a kernel agent run IPython kernels: the kernelspec's argv must be "
            f"[python, -m, ipykernel_launcher, -f, {{connection_file}}, ...], not {argv}"
        )
    return argv[argv.index("-f") + 2 :]
