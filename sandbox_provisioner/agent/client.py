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

    def __init__(self, host: str, port: int, channel: Channel, session: bytes, greeting: dict):
        self.host, self.port = host, port
        self.session = session
        self._channel = channel
        self._lock = asyncio.Lock()
        #: Kernel starts the agent had done when this connection was made.
        self.starts_before = int(greeting.get("starts", 0))

    @property
    def kernel_key(self) -> str:
        return kernel_key(self.session)

    @classmethod
    async def claim(
        cls, host: str, port: int, signing_key: Ed25519PrivateKey, timeout: float = 10.0
    ) -> AgentClient:
        return await cls._connect(host, port, timeout, signing_key=signing_key)

    @classmethod
    async def resume(
        cls, host: str, port: int, session: bytes, timeout: float = 10.0
    ) -> AgentClient:
        return await cls._connect(host, port, timeout, session=session)

    @classmethod
    async def _connect(
        cls,
        host: str,
        port: int,
        timeout: float,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        session: bytes | None = None,
    ) -> AgentClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=MAX_FRAME), timeout
        )
        try:
            greeting = await asyncio.wait_for(read_frame(reader), timeout)
            if not greeting or greeting.get("agent") != AGENT_NAME:
                raise ProtocolError(f"{host}:{port} is not a kernel agent")
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
            return cls(host, port, channel, session, body)
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
