"""Byte streams carried between a sandbox's Unix sockets and the host's TCP, both ways.

The supervisor carries the proxy's connections to a user's server and the server's to the
Hub API with them; a Binder preparation's forwarder and its egress proxy (:mod:`.binder`)
carry a sandbox's only way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

_CHUNK = 1 << 16


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def join(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connect: Any
) -> None:
    """Carry one accepted connection to a new one made by ``connect()``, both ways."""
    try:
        upstream_reader, upstream_writer = await connect()
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def forward_tcp_to_unix(port: int, path: str) -> asyncio.Server:
    """127.0.0.1:``port`` -> the Unix socket ``path``."""
    return await asyncio.start_server(
        lambda r, w: join(r, w, lambda: asyncio.open_unix_connection(path)), "127.0.0.1", port
    )


async def forward_unix_to_tcp(path: str, host: str, port: int) -> asyncio.Server:
    """The Unix socket ``path`` (made here, 0666 in a directory only its sandbox sees) ->
    ``host:port``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(
        lambda r, w: join(r, w, lambda: asyncio.open_connection(host, port)), path
    )
    os.chmod(path, 0o666)  # the server in the sandbox runs as the user's uid
    return server
