"""Byte streams carried between a sandbox's Unix sockets and the host's TCP, both ways.

The supervisor carries the proxy's connections to a user's server and the server's to the
Hub API with them; a Binder preparation's forwarder and its egress proxy (:mod:`.binder`)
carry a sandbox's only way out.

The server's socket lies in its run directory, which is the user's: their code can put
anything there under the socket's name. Root connects only to a socket node that is
itself in that directory (:func:`open_own_unix_connection`), never through a link: a
link to another socket (a root-only one, another user's server) is refused. A socket
the user made there is theirs, and answers only their own route.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

_CHUNK = 1 << 16
#: Called as a connection opens and before each chunk it carries; False closes it.
Gate = Callable[[], bool]


def _open(gate: Gate | None) -> bool:
    return gate is None or gate()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               gate: Gate | None = None) -> None:  # fmt: skip
    try:
        while data := await reader.read(_CHUNK):
            if not _open(gate):
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class Connections(set):
    """The writers of the connections a forwarder carries (both ends of each), so that
    they can all be closed at once: a hibernation's checkpoint fails while the sandbox
    holds a socket of the host's."""

    def close_all(self) -> None:
        for writer in list(self):
            with contextlib.suppress(Exception):
                writer.close()


async def join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connect: Any,
               gate: Gate | None = None, live: Connections | None = None) -> None:  # fmt: skip
    """Carry one accepted connection to a new one made by ``connect()``, both ways;
    ``gate`` (see :data:`Gate`) is asked as it opens and for each chunk either way;
    ``live`` holds both ends while it lasts."""
    if not _open(gate):
        writer.close()
        return
    try:
        upstream_reader, upstream_writer = await connect()
    except OSError:
        writer.close()
        return
    ends = (writer, upstream_writer)
    if live is not None:
        live.update(ends)
    try:
        await asyncio.gather(pipe(reader, upstream_writer, gate),
                             pipe(upstream_reader, writer, gate))  # fmt: skip
    finally:
        if live is not None:
            live.difference_update(ends)


def open_socket_node(path: str) -> int:
    """An ``O_PATH`` descriptor of the socket ``path`` names, its last component not
    followed: a link (or anything but a socket) there is refused. The directory holding
    it may be a user's; the directories above it must not be."""
    parent, name = os.path.split(path)
    directory = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    finally:
        os.close(directory)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConnectionRefusedError(f"{path} is not a socket (a link?): refused")
    return fd


async def open_own_unix_connection(path: str) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:  # fmt: skip
    """A connection to the socket node at ``path`` itself (:func:`open_socket_node`),
    made through its descriptor, so no name is looked up twice."""
    fd = open_socket_node(path)
    try:
        return await asyncio.open_unix_connection(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


async def forward_tcp_to_unix(port: int, path: str, own_socket: bool = False,
                              gate: Gate | None = None,
                              live: Connections | None = None) -> asyncio.Server:  # fmt: skip
    """127.0.0.1:``port`` -> the Unix socket ``path``; ``own_socket``: only the socket node
    at ``path`` itself, never through a link (``path``'s directory is a user's); ``gate``
    and ``live``: see :func:`join`."""
    connect = open_own_unix_connection if own_socket else asyncio.open_unix_connection
    return await asyncio.start_server(
        lambda r, w: join(r, w, lambda: connect(path), gate, live), "127.0.0.1", port
    )


async def forward_unix_to_tcp(path: str, host: str, port: int,
                              live: Connections | None = None) -> asyncio.Server:  # fmt: skip
    """The Unix socket ``path`` (made here, 0666, in a directory the sandbox's user may
    write) -> ``host:port``. Its mode comes with it at bind (the umask): nothing is done
    to ``path`` by name after it exists, when the user could have swapped it for a link."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o111)  # 0666: the server in the sandbox runs as the user's uid
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return await asyncio.start_unix_server(
        lambda r, w: join(r, w, lambda: asyncio.open_connection(host, port), live=live),
        sock=sock,
    )
