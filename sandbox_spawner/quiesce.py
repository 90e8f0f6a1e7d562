"""Inside a user's server: let go of the host before a hibernation, take it up again after.

A gVisor sandbox cannot be checkpointed while it holds a socket of the host's (runsc
fails), and a server holds one for as long as it listens: its Unix socket in the run
directory, which the supervisor (:mod:`.supervisor`) carries the proxy's traffic to.
So before a hibernation's checkpoint (:mod:`.hibernation`) the supervisor asks the
server to stop listening, and after the restore tells it to listen again:

* ``POST <base_url>api/sandbox/quiesce`` with the server's activity key (the one
  :mod:`.activity` checks; only root's supervisor and service hold it): the server
  closes its listening socket, waits until every other connection is closed (the
  supervisor closes its ends of them meanwhile) and answers its own process id;
* ``SIGUSR2`` to that process (``runsc kill --pid``): the server listens again, at the
  same path (in the restored sandbox's new run directory). Unused by jupyter_server,
  which takes SIGUSR1 for its own;
* ``GET`` of the same path, with the key, after the restore: which of the kernels that
  ran at the quiesce are gone or were restarted (a restore can lose a process).

The server's kernels, terminals and their state are untouched: a kernel's
sockets are on the sandbox's own loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
from typing import Any

PATH = "api/sandbox/quiesce"
RESUME_SIGNAL = signal.SIGUSR2
#: Seconds the server waits for the supervisor's connections to close.
DRAIN_TIMEOUT = 5.0


def close_listeners(http_server: Any) -> int:
    """Close every listening socket of ``http_server`` (a tornado HTTPServer); how many.
    Not ``stop()``: tornado stops a server once, and this one listens again."""
    closed = 0
    for fd, sock in list(http_server._sockets.items()):
        http_server._handlers.pop(fd)()  # off the event loop
        del http_server._sockets[fd]
        sock.close()
        closed += 1
    return closed


async def wait_for_connections(http_server: Any, most: int, timeout: float) -> int:
    """Wait until ``http_server`` has at most ``most`` connections open (this request's
    own among them), or ``timeout`` seconds; how many it has."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(http_server._connections) > most:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    return len(http_server._connections)


def listen_again(serverapp: Any) -> None:
    """Listen at the server's socket path again, unless it does already."""
    from tornado.netutil import bind_unix_socket

    if serverapp.http_server._sockets:
        return
    sock = bind_unix_socket(serverapp.sock, mode=int(serverapp.sock_mode.encode(), 8))
    serverapp.http_server.add_socket(sock)
    serverapp.log.info("sandbox_spawner.quiesce: listening again at %s", serverapp.sock)


def kernel_processes(serverapp: Any) -> dict[str, int]:
    """Each running kernel's process id (those this server started itself)."""
    found = {}
    for kernel_id in serverapp.kernel_manager.list_kernel_ids():
        process = getattr(serverapp.kernel_manager.get_kernel(kernel_id).provisioner,
                          "process", None)  # fmt: skip
        if process is not None and process.poll() is None:
            found[kernel_id] = process.pid
    return found


def handler(serverapp: Any, key: str, header: str) -> type:
    from jupyter_server.auth.decorator import allow_unauthenticated
    from tornado import web

    #: The kernels' processes when the server stopped listening: after a restore, any of
    #: them that is gone (or was restarted) did not survive it.
    before: dict[str, int] = {}

    class QuiesceHandler(web.RequestHandler):
        """The supervisor's request (the activity key, nobody else's): stop listening
        (POST); after a restore, which kernels did not come back (GET)."""

        def check_xsrf_cookie(self) -> None:
            """No cookie is used: the key in a header is the credential."""

        def _check_key(self) -> None:
            given = self.request.headers.get(header, "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise web.HTTPError(403)

        @allow_unauthenticated
        def get(self) -> None:
            self._check_key()
            now = kernel_processes(serverapp)
            lost = sorted(k for k, pid in before.items() if now.get(k) != pid)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"kernels": len(before), "lost": lost}))

        @allow_unauthenticated
        async def post(self) -> None:
            self._check_key()
            if not serverapp.sock:
                raise web.HTTPError(409, "the server listens on no Unix socket")
            loop = asyncio.get_running_loop()
            signal.signal(RESUME_SIGNAL,
                          lambda *_: loop.call_soon_threadsafe(listen_again, serverapp))
            before.clear()
            before.update(kernel_processes(serverapp))
            closed = close_listeners(serverapp.http_server)
            # The supervisor closes its ends of every other connection now: each must be
            # closed here too before the checkpoint (a host's socket held open breaks it).
            left = await wait_for_connections(serverapp.http_server, 1, DRAIN_TIMEOUT)
            serverapp.log.info("sandbox_spawner.quiesce: %d listening socket(s) closed for "
                               "a hibernation, %d other connection(s) left", closed,
                               left - 1)  # fmt: skip
            if left > 1:
                listen_again(serverapp)
                raise web.HTTPError(409, f"{left - 1} connection(s) stay open")
            self.set_header("Content-Type", "application/json")
            self.set_header("Connection", "close")
            self.finish(json.dumps({"pid": os.getpid(), "closed": closed}))

    return QuiesceHandler
