"""A server's supervisor, controlled: freeze and thaw its sandbox, and say which it is.

The hibernator (:mod:`.hibernator`, root, on the Hub's machine) freezes an idle server
instead of stopping it: every process of its sandbox stopped where it is, in the cgroup
freezer, so it uses no CPU and keeps its memory, kernels and their variables included.
The supervisor (:mod:`.supervisor`) does it, because it sees every byte the proxy sends
the server: the first byte of any request (a new visit, or a message on a websocket a
browser kept open) thaws the server before it is passed on, so the user waits about a
millisecond, not a restart.

The channel is a Unix socket in the server's state directory, root's alone (0600, in a
directory no user lists or enters from a sandbox): one JSON request per connection, one
answer, each at most :data:`MAX_MESSAGE` bytes.

* ``{"do": "status"}``: ``{"state": "running"|"frozen", "frozen_since", "last_activity",
  "quiet", "thaws"}``: ``quiet`` is the seconds since the proxy last sent or received a
  byte; with ``"take_thaws": true`` (the hibernator's), ``thaws``: the seconds each thaw
  took since it last took them (at most 100);
* ``{"do": "freeze", "quiet": S, "last_activity": T}``: freeze, unless the proxy carried
  anything within the last ``S`` seconds (the Hub's record of activity lags by minutes;
  this one does not); ``T`` is kept, for the hibernator's later sweeps, as the server's
  last activity (a frozen server cannot be asked);
* ``{"do": "thaw"}``;
* ``{"do": "hibernate"}``: save the server to disk and end it (:mod:`.hibernation`):
  ``{"ok", "ended", "reason"|"bytes"}``, once done (seconds: the server's memory).

The hibernator asks a server whether it is in use at a port of its own (the gate
:meth:`Freezer.awake`) that neither thaws it nor counts as traffic: asking must not
keep a server awake, and a frozen server is not asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import socket
import time
from typing import Any

from sandbox_provisioner.limits import FreezeError
from sandbox_provisioner.runtimes.base import Sandbox

log = logging.getLogger("jupyter-sandbox-supervisor")
#: The socket's name in the server's state directory.
SOCKET = "freezer.sock"
MAX_MESSAGE = 4096


class Freezer:
    """One server's sandbox, frozen when idle and thawed by the next byte for it."""

    def __init__(self, sandbox: Sandbox | None = None):
        #: Set once the sandbox runs (the forwarders are up before it starts).
        self.sandbox = sandbox
        self.last_traffic = time.monotonic()
        self.frozen_since: str | None = None
        self.last_activity: str | None = None
        #: Set by :meth:`stop`: the server is being stopped, and is frozen no more.
        self.stopping = False
        self._freezing: asyncio.Future | None = None
        #: Seconds each thaw took, since the hibernator last asked (its metric).
        self.thaws: list[float] = []
        #: Set while the server hibernates: the proxy's traffic is refused, not carried.
        self.closed = False
        #: The supervisor's hibernation of the server (:meth:`.hibernation.Hibernation.run`).
        self.on_hibernate: Any = None
        self.hibernation_answered = asyncio.Event()

    # -- called by the proxy's forwarder for each connection and each chunk ----------------
    def traffic(self) -> bool:
        """The proxy carries something to or from the server: thaw it first if frozen.
        Refused while the server hibernates."""
        if self.closed:
            return False
        self.last_traffic = time.monotonic()
        if self.frozen_since is not None and self.sandbox is not None:
            began = time.perf_counter()
            self.sandbox.thaw()
            self.frozen_since = None
            took = time.perf_counter() - began
            self.thaws = [*self.thaws[-99:], took]
            log.info("thawed the server in %.1f ms: a request came", took * 1000)
        return True

    def awake(self) -> bool:
        """For the hibernator's own port: answered while the server runs, refused while it
        is frozen (asking thaws nothing) or hibernating."""
        return self.frozen_since is None and not self.closed

    # -- the control channel's requests ----------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = "frozen" if self.frozen_since is not None else "running"
        return {
            "state": "hibernating" if self.closed else state,
            "frozen_since": self.frozen_since,
            "last_activity": self.last_activity,
            "quiet": round(time.monotonic() - self.last_traffic, 3),
        }

    async def freeze(self, quiet: float, last_activity: str | None) -> dict[str, Any]:
        if self.frozen_since is not None:
            return {"ok": True, **self.status()}
        since = time.monotonic() - self.last_traffic
        if since < quiet:
            return {"ok": False, "reason": f"the proxy carried a request {since:.0f}s ago",
                    **self.status()}  # fmt: skip
        began = self.last_traffic
        if self.sandbox is None or self.stopping:
            return {"ok": False, "reason": "the server is starting or stopping",
                    **self.status()}  # fmt: skip
        self._freezing = asyncio.ensure_future(self.sandbox.freeze())
        try:
            await self._freezing
        except FreezeError as exc:
            return {"ok": False, "reason": str(exc), **self.status()}
        except asyncio.CancelledError:  # a stop came while its processes were stopping
            return {"ok": False, "reason": "the server is stopping", **self.status()}
        finally:
            self._freezing = None
        if self.last_traffic != began:  # a request came while its processes were stopping
            self.sandbox.thaw()
            return {"ok": False, "reason": "a request came while freezing", **self.status()}
        self.frozen_since = datetime.datetime.now(datetime.UTC).isoformat()
        self.last_activity = last_activity
        log.info("froze the server (idle; last activity %s)", last_activity)
        return {"ok": True, **self.status()}

    def thaw(self) -> None:
        if self.sandbox is not None:
            self.sandbox.thaw()  # whatever this process believes: a thaw costs nothing
        if self.frozen_since is not None:
            self.frozen_since = None
            log.info("thawed the server")

    def stop(self) -> None:
        """The server is to stop: no freeze from now on, one in progress called off, and
        the sandbox thawed (a frozen process takes no signal, and the stop must not hang
        on it)."""
        self.stopping = True
        if self._freezing is not None:
            self._freezing.cancel()  # freeze_cgroup thaws as it is cancelled
        self.thaw()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        what = request.get("do")
        if what == "status":
            if request.get("take_thaws") is not True:
                return self.status()
            thaws, self.thaws = self.thaws, []  # the hibernator's, for its metric
            return {**self.status(), "thaws": thaws}
        if what == "freeze":
            quiet, last = request.get("quiet", 0), request.get("last_activity")
            if not isinstance(quiet, int | float) or not (last is None or isinstance(last, str)):
                return {"ok": False, "reason": "quiet: a number; last_activity: a time"}
            return await self.freeze(float(quiet), last and last[:64])
        if what == "thaw":
            self.thaw()
            return {"ok": True, **self.status()}
        if what == "hibernate":
            if self.closed:
                return {"ok": False, "ended": False, "reason": "it is hibernating already"}
            if self.on_hibernate is None or self.sandbox is None or self.stopping:
                return {"ok": False, "ended": False,
                        "reason": "the server is starting or stopping"}  # fmt: skip
            return await self.on_hibernate(self.sandbox)
        return {"ok": False, "reason": f"unknown request {str(what)[:32]!r}"}


async def serve(path: str, freezer: Freezer) -> asyncio.Server:
    """The control socket at ``path`` (root's, 0600: made so at bind)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request: Any = {}
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line[:MAX_MESSAGE])
                if not isinstance(request, dict):
                    raise ValueError
                reply = await freezer.handle(request)
            except ValueError:
                request, reply = {}, {"ok": False, "reason": "not a JSON object"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError, ValueError):  # ValueError: too long
            pass
        finally:
            if isinstance(request, dict) and request.get("do") == "hibernate":
                freezer.hibernation_answered.set()  # told, or the asker is gone
            with contextlib.suppress(Exception):
                writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    return await asyncio.start_unix_server(answer, sock=sock, limit=MAX_MESSAGE)


async def request(path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send ``message`` to the supervisor listening at ``path``; its answer."""

    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_MESSAGE)
        try:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline())
        finally:
            writer.close()
        if not isinstance(answer, dict):
            raise ValueError("the supervisor's answer is no JSON object")
        return answer

    return await asyncio.wait_for(exchange(), timeout)
