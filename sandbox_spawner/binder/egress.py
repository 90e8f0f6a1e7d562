"""An egress allowlist, enforced: the only way out of a preparation sandbox.

A preparation sandbox has no network (a namespace of its own: loopback only). Inside,
a forwarder (:mod:`.inside`) listens on loopback and carries each connection to a
Unix socket bound in from the host, where this proxy reads one HTTP request:
``CONNECT host:port`` (https, git over https) or a request for an absolute
``http://`` URL. It connects only to hosts on the allowlist and answers anything
else ``403``. Processes in the sandbox find it through ``http_proxy`` and
``https_proxy``; one that ignores the variables reaches nothing at all.

On Kubernetes, where a preparation is a pod, one proxy in the Hub service serves them
all over TCP (:class:`SharedEgressProxy`): each preparation gets a token, sent as the
proxy's credentials (``http://binder:TOKEN@host:port``, which pip, git and curl send
as ``Proxy-Authorization``), that names its allowlist; a NetworkPolicy lets
preparation pods reach that port and nothing else.

Written here (about a hundred lines) rather than taken from a proxy library: it
listens on a Unix socket, decides on the name the client asked for before it
connects, and does nothing else (no cache, no TLS interception, no DNS for the
sandbox).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import logging
import os
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..streams import pipe

log = logging.getLogger("jupyter-sandbox-binder")
_HEADER_LIMIT = 64 * 1024
_HOP_HEADERS = (b"proxy-connection:", b"proxy-authorization:", b"connection:", b"keep-alive:")


@dataclass(frozen=True)
class Allowlist:
    """``host`` or ``host:port`` entries; hosts are ``fnmatch`` patterns (``*.example.org``).
    An entry without a port allows 80 and 443."""

    entries: tuple[str, ...]

    def allows(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        for entry in self.entries:
            entry = entry.lower()
            pattern, _, wanted = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
            port_ok = int(wanted) == port if wanted else port in (80, 443)
            if port_ok and fnmatch.fnmatch(host, pattern):
                return True
        return False


def _has_port(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and not head.endswith(":")


@dataclass
class EgressProxy:
    """The host side: one per preparation; ``denied`` lists what was refused."""

    allowlist: Allowlist
    denied: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._handle, path, limit=_HEADER_LIMIT)
        os.chmod(path, 0o666)  # the sandbox's unprivileged user connects; its directory is private

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def _allowlist(self, headers: bytes) -> tuple[Allowlist, list[str]] | None:
        """The allowlist this request is held to, and where its refusals are noted."""
        return self.allowlist, self.denied

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            first, _, headers = head.partition(b"\r\n")
            method, target, version = first.decode("latin-1").split(" ", 2)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ConnectionError):  # fmt: skip
            writer.close()
            return
        held = self._allowlist(headers)
        if held is None:
            return await self._answer(writer, 407, "no valid preparation token")
        allowlist, denied = held
        if method.upper() == "CONNECT":
            where = urlsplit("//" + target)
            forward = b""
        else:
            where = urlsplit(target)
            if where.scheme != "http":
                return await self._answer(writer, 400, "only http:// URLs and CONNECT")
            path = (where.path or "/") + (f"?{where.query}" if where.query else "")
            lines = headers.split(b"\r\n")
            kept = [h for h in lines if h and not h.lower().startswith(_HOP_HEADERS)]
            # One request per connection: the next may be for another host.
            forward = b"\r\n".join([f"{method} {path} {version}".encode("latin-1"), *kept,
                                    b"Connection: close", b"", b""])  # fmt: skip
        try:
            host, port = where.hostname or "", where.port or (443 if not forward else 80)
        except ValueError:
            return await self._answer(writer, 400, "malformed host")
        if not host or not allowlist.allows(host, port):
            denied.append(f"{host}:{port}")
            log.info("egress denied: %s:%s", host, port)
            return await self._answer(writer, 403, f"{host}:{port} is not on this "
                                      "deployment's egress allowlist")  # fmt: skip
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        except (OSError, TimeoutError) as exc:
            return await self._answer(writer, 502, f"cannot reach {host}:{port}: {exc}")
        if forward:
            up_writer.write(forward)
        else:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, code: int, message: str) -> None:
        reason = {400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required",
                  502: "Bad Gateway"}[code]  # fmt: skip
        body = (message + "\n").encode()
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)  # fmt: skip
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


class SharedEgressProxy(EgressProxy):
    """One TCP proxy for many preparations (pods), each held to its own allowlist by the
    token in its proxy credentials."""

    def __init__(self) -> None:
        super().__init__(Allowlist(()))
        self._tokens: dict[str, tuple[Allowlist, list[str]]] = {}

    async def start_tcp(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=_HEADER_LIMIT)

    def register(self, allowlist: Allowlist) -> tuple[str, list[str]]:
        """A new token for a preparation held to ``allowlist``; its refusals' list."""
        token, denied = secrets.token_urlsafe(24), []
        self._tokens[token] = (allowlist, denied)
        return token, denied

    def unregister(self, token: str) -> None:
        self._tokens.pop(token, None)

    def _allowlist(self, headers: bytes) -> tuple[Allowlist, list[str]] | None:
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() != b"proxy-authorization":
                continue
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() != b"basic":
                return None
            with contextlib.suppress(ValueError, binascii.Error):
                _, _, token = base64.b64decode(credentials).decode().partition(":")
                return self._tokens.get(token)
        return None
