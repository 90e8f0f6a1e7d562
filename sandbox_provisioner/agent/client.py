"""The controller's side of the agent protocol: claim a sandbox's agent, then drive it."""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .protocol import (
    AGENT_NAME,
    MAX_FRAME,
    Channel,
    ProtocolError,
    Refused,
    b64,
    kernel_key,
    make_claim,
    read_frame,
    resume_proof,
    unb64,
    write_frame,
)

#: Where an agent listens: (host, port), or a Unix socket's path.
Address = tuple[str, int] | str


class AgentError(RuntimeError):
    """The agent answered a request with an error."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


class AgentClient:
    """One authenticated connection to a kernel agent.

    :meth:`claim` makes this controller the sandbox's only one and yields the
    session key; keep it (it is in the provisioner info) to :meth:`resume`
    later from a new connection or a new process.
    """

    def __init__(self, address: Address, channel: Channel, session: bytes):
        self.address = address
        self.session = session
        self._channel = channel
        self._lock = asyncio.Lock()

    @property
    def kernel_key(self) -> str:
        return kernel_key(self.session)

    @classmethod
    async def claim(
        cls, address: Address, signing_key: Ed25519PrivateKey, timeout: float = 10.0
    ) -> AgentClient:
        """Become the controller of the agent at ``address`` ((host, port) or a Unix path)."""
        return await cls._connect(address, timeout, signing_key=signing_key)

    @classmethod
    async def resume(cls, address: Address, session: bytes, timeout: float = 10.0) -> AgentClient:
        return await cls._connect(address, timeout, session=session)

    @classmethod
    async def _connect(
        cls,
        address: Address,
        timeout: float,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        session: bytes | None = None,
    ) -> AgentClient:
        if isinstance(address, str):
            opening = asyncio.open_unix_connection(address, limit=MAX_FRAME)
        else:
            opening = asyncio.open_connection(*address, limit=MAX_FRAME)
        reader, writer = await asyncio.wait_for(opening, timeout)
        try:
            greeting = await asyncio.wait_for(read_frame(reader), timeout)
            if not greeting or greeting.get("agent") != AGENT_NAME:
                raise ProtocolError(f"{address} is not a kernel agent")
            nonce = unb64(greeting.get("nonce"))
            if signing_key is not None:
                frame, session = make_claim(greeting, signing_key)
            else:
                assert session is not None
                frame = {"op": "resume", "proof": b64(resume_proof(session, nonce))}
            await write_frame(writer, frame)
            channel = Channel(reader, writer, session, nonce, is_agent=False)
            first = await asyncio.wait_for(read_frame(reader), timeout)
            if first is None:
                raise ProtocolError("the agent closed the connection")
            if "refused" in first:
                raise Refused(str(first["refused"]))
            # The first authenticated frame proves the agent derived the same session.
            body = channel.verify(first)
            if not body.get("ok"):
                raise ProtocolError("the agent did not confirm the session")
            return cls(address, channel, session)
        except BaseException:
            writer.close()
            raise

    async def request(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one request; its reply, or AgentError with the agent's message."""
        async with self._lock:
            await self._channel.send({"op": op, **fields})
            reply = await asyncio.wait_for(self._channel.recv(), timeout)
        if reply is None:
            raise ConnectionError("the kernel agent closed the connection")
        if not reply.get("ok"):
            raise AgentError(str(reply.get("error", "request failed")), reply.get("log", ""))
        return reply

    def close(self) -> None:
        self._channel.close()
