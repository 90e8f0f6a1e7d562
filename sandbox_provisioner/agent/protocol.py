"""The kernel agent's wire protocol: one controller per sandbox, every frame authenticated.

A warm sandbox is started before anyone knows whose kernel it will run, so
nothing per-kernel can be in its spec (upstream forces a cold start when a
claim injects env). What the sandbox does know is the *controller key*: the
Ed25519 public key of the Jupyter servers allowed to drive it, pinned in the
SandboxTemplate (``JUPYTER_SANDBOX_CONTROLLER_KEYS``). It is public; the
private half stays with the servers.

A connection, as newline-delimited JSON:

1. agent -> ``{"agent": "jupyter-sandbox", "version": 1, "nonce", "pub", "claimed"}``:
   a fresh 32-byte nonce and a fresh X25519 public key.
2. controller -> either
   ``{"op": "claim", "pub", "sig"}``: its own X25519 key and an Ed25519
   signature over (nonce, agent key, controller key). Accepted once in the
   sandbox's life, only with a signature by a pinned key. Both sides derive
   the *session key* from the X25519 exchange; it never crosses the wire.
   or ``{"op": "resume", "proof"}``: an HMAC of the nonce under the session
   key, for later connections of the same controller (reconnect, a restarted
   server that kept the session in its provisioner info).
3. From then on each frame in both directions is ``{"seq", "body", "mac"}``,
   the MAC keyed by a per-connection key derived from the session key and the
   nonce, over the direction, the sequence number and the body: frames cannot
   be forged, replayed or reordered, on this or any other connection.

So a sandbox obeys exactly one controller: the first holder of a pinned key
to claim it. Everyone else (other pods, the kernel it runs, another server
with the same key) is refused, and refused again after a claimed sandbox's
kernel restarts. The Jupyter message key (HMAC of the kernel protocol) is
derived from the session key too, so it is never sent either.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
AGENT_NAME = "jupyter-sandbox"
#: The template's environment variable with the pinned controller keys (comma-separated).
CONTROLLER_KEYS_ENV = "JUPYTER_SANDBOX_CONTROLLER_KEYS"
#: The agent's default TCP port.
DEFAULT_PORT = 8900
#: Ports of the kernel's five ZMQ sockets, by connection-info name.
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
MAX_FRAME = 256 * 1024
_KEY_PREFIX = "ed25519:"


class ProtocolError(Exception):
    """The peer broke the protocol or failed authentication; the connection is dropped."""


class Refused(ProtocolError):
    """The agent refused this controller (not a pinned key, or already claimed by another)."""


# -- keys ------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"bad base64: {exc}") from None


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The form pinned in templates: ``ed25519:<base64 of the raw 32 bytes>``."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _KEY_PREFIX + b64(raw)


def parse_public_keys(text: str) -> list[Ed25519PublicKey]:
    """Pinned keys from ``ed25519:...[,ed25519:...]``; ValueError names a bad one."""
    keys = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.startswith(_KEY_PREFIX):
            raise ValueError(f"controller key {part[:20]!r}... does not start with {_KEY_PREFIX}")
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(unb64(part[len(_KEY_PREFIX) :])))
        except (ProtocolError, ValueError) as exc:
            raise ValueError(
                f"controller key {part[:20]!r}... is not an Ed25519 key: {exc}"
            ) from None
    return keys


def load_or_create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The controller's private key at ``path`` (PEM, mode 0600), made on first use."""
    file = Path(path)
    if file.exists():
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{file} does not hold an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


# -- derivations -----------------------------------------------------------------------------
def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=info).derive(secret)


def claim_transcript(nonce: bytes, agent_pub: bytes, controller_pub: bytes) -> bytes:
    return b"jupyter-sandbox claim v1\0" + nonce + agent_pub + controller_pub


def session_key(shared: bytes, nonce: bytes) -> bytes:
    return _hkdf(shared, nonce, b"jupyter-sandbox session v1")


def resume_proof(session: bytes, nonce: bytes) -> bytes:
    return hmac.new(session, b"jupyter-sandbox resume v1\0" + nonce, hashlib.sha256).digest()


def kernel_key(session: bytes) -> str:
    """The Jupyter message signing key both sides derive from the session."""
    return _hkdf(session, b"", b"jupyter-sandbox kernel key v1").hex()


@dataclass
class Handshake:
    """The agent's half of one connection's handshake."""

    nonce: bytes
    private: X25519PrivateKey

    @classmethod
    def new(cls) -> Handshake:
        return cls(os.urandom(32), X25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def greeting(self, claimed: bool) -> dict[str, Any]:
        return {
            "agent": AGENT_NAME,
            "version": VERSION,
            "nonce": b64(self.nonce),
            "pub": b64(self.public),
            "claimed": claimed,
        }

    def verify_claim(self, frame: dict[str, Any], keys: list[Ed25519PublicKey]) -> bytes:
        """The session key if ``frame`` is a claim signed by one of ``keys``."""
        controller_pub = unb64(frame.get("pub"))
        signature = unb64(frame.get("sig"))
        transcript = claim_transcript(self.nonce, self.public, controller_pub)
        for key in keys:
            try:
                key.verify(signature, transcript)
                break
            except InvalidSignature:
                continue
        else:
            raise Refused("claim not signed by a controller key this sandbox trusts")
        try:
            peer = X25519PublicKey.from_public_bytes(controller_pub)
        except ValueError as exc:
            raise ProtocolError(f"bad controller key: {exc}") from None
        return session_key(self.private.exchange(peer), self.nonce)


def make_claim(greeting: dict[str, Any], signing_key: Ed25519PrivateKey) -> tuple[dict, bytes]:
    """The controller's claim frame for ``greeting``, and the session key it yields."""
    nonce, agent_pub = unb64(greeting.get("nonce")), unb64(greeting.get("pub"))
    mine = X25519PrivateKey.generate()
    my_pub = mine.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    signature = signing_key.sign(claim_transcript(nonce, agent_pub, my_pub))
    try:
        shared = mine.exchange(X25519PublicKey.from_public_bytes(agent_pub))
    except ValueError as exc:
        raise ProtocolError(f"bad agent key: {exc}") from None
    return {"op": "claim", "pub": b64(my_pub), "sig": b64(signature)}, session_key(shared, nonce)


# -- authenticated framing -------------------------------------------------------------------
class Channel:
    """Both directions of one authenticated connection (either side)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: bytes,
        nonce: bytes,
        *,
        is_agent: bool,
    ):
        self.reader, self.writer = reader, writer
        self._key = _hkdf(session, nonce, b"jupyter-sandbox frames v1")
        self._out, self._in = ("agent", "controller") if is_agent else ("controller", "agent")
        self._send_seq = self._recv_seq = 0

    def _mac(self, direction: str, seq: int, body: Any) -> str:
        data = json.dumps([direction, seq, body], sort_keys=True, separators=(",", ":"))
        return b64(hmac.new(self._key, data.encode(), hashlib.sha256).digest())

    async def send(self, body: dict[str, Any]) -> None:
        seq, self._send_seq = self._send_seq, self._send_seq + 1
        await write_frame(
            self.writer, {"seq": seq, "body": body, "mac": self._mac(self._out, seq, body)}
        )

    async def recv(self) -> dict[str, Any] | None:
        frame = await read_frame(self.reader)
        return None if frame is None else self.verify(frame)

    def verify(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The body of ``frame`` (the next one expected), if its MAC is right."""
        seq, body = frame.get("seq"), frame.get("body")
        expected = self._mac(self._in, self._recv_seq, body)
        if seq != self._recv_seq or not hmac.compare_digest(str(frame.get("mac")), expected):
            raise ProtocolError("frame failed authentication")
        self._recv_seq += 1
        if not isinstance(body, dict):
            raise ProtocolError("frame body is not an object")
        return body

    def close(self) -> None:
        self.writer.close()


async def write_frame(writer: asyncio.StreamWriter, frame: dict[str, Any]) -> None:
    writer.write(json.dumps(frame, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """One frame, or None at end of stream."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed mid-frame") from None
        return None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"frame longer than {MAX_FRAME} bytes") from None
    try:
        frame = json.loads(line)
    except ValueError:
        raise ProtocolError("frame is not JSON") from None
    except RecursionError:  # a deeply nested frame, before anyone is authenticated
        raise ProtocolError("frame is nested too deeply") from None
    if not isinstance(frame, dict):
        raise ProtocolError("frame is not a JSON object")
    return frame
