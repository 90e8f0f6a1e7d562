"""How the hibernator learns whether a server is in use, without handing it a credential.

A user's server is the user's code: it can replace its own socket or listener, log
the headers of every request and relay them. So nothing of the Hub's or of the
service's may reach it. Instead each server start gets a key of its own, valid for
one question only, "are you in use?", and for that server only:

* the spawner (:class:`ActivityKey`, in the Hub) makes a fresh key at every start,
  gives it to the server in its environment (:data:`KEY_ENV`) and keeps it, with the
  server's own address, in its state, which only administrators and the service read
  (scope ``admin:server_state``);
* the server runs the extension :func:`_load_jupyter_server_extension`, which answers
  ``GET <base_url>api/sandbox/activity`` to a request carrying that key, and to
  nothing else: how many of its kernels are busy, how many terminals are open, and
  when it last did anything (jupyter_server's own account: kernels' messages, API
  requests, terminals);
* the hibernator (:mod:`.hibernator`) asks the server at its own address, not through
  the proxy (a request through the proxy would count as the user's activity there),
  and reads the answer as input from a stranger (:func:`parse_report`): small,
  strictly typed, bounded.

A server that learns its key learns nothing it did not know: the key opens no Hub
API, no other server, nothing of its own server's but this answer and, for its root
supervisor before a hibernation, :mod:`.quiesce` (which only the server's own listening
can be stopped with, and the server's code can do that anyway). A server that lies
can only keep itself running (its limits still apply).
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

#: The server's environment variable that holds its key.
KEY_ENV = "JUPYTER_SANDBOX_ACTIVITY_KEY"
#: The request header that carries it.
HEADER = "X-Jupyter-Sandbox-Activity-Key"
#: Below the server's base URL.
PATH = "api/sandbox/activity"
#: The server's command-line option that loads the extension.
EXTENSION_ARG = "--ServerApp.jpserver_extensions=sandbox_spawner.activity=True"
#: The largest answer the hibernator reads.
MAX_REPORT = 4096
_BUSY = frozenset({"busy", "starting"})
_MAX_COUNT = 1 << 20


def new_key() -> str:
    return secrets.token_urlsafe(32)


class ActivityKey:
    """Mixin for a Spawner: a fresh key per start (:meth:`new_activity_key`, called at the
    start of ``start``), in the server's environment, and in the spawner's state with the
    server's address once it runs."""

    activity_key: str | None = None
    #: The server's own address, as the spawner's state had it (a Hub restart keeps it).
    _activity_url: str | None = None

    def new_activity_key(self) -> None:
        self.activity_key = new_key()

    def get_args(self) -> list[str]:
        return [*super().get_args(), EXTENSION_ARG]  # type: ignore[misc]

    def get_env(self) -> dict[str, str]:
        env = super().get_env()  # type: ignore[misc]
        if self.activity_key:
            env[KEY_ENV] = self.activity_key
        return env

    def activity_url(self) -> str | None:
        """Where the server answers, at its own address (not the proxy's)."""
        server = getattr(self, "server", None)
        if server is None or not server.ip or not server.port:
            return self._activity_url
        return server.url + PATH  # the proxy's target: the server's own address

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()  # type: ignore[misc]
        url = self.activity_url()
        if self.activity_key and url:
            state["activity"] = {"url": url, "key": self.activity_key}
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)  # type: ignore[misc]
        found = state.get("activity") or {}
        self.activity_key = found.get("key")
        self._activity_url = found.get("url")

    def clear_state(self) -> None:
        super().clear_state()  # type: ignore[misc]
        self.activity_key = self._activity_url = None


# -- what the hibernator reads -----------------------------------------------------------
class BadReport(ValueError):
    """A server's answer is not a report; the message says why."""


@dataclass(frozen=True)
class Report:
    busy_kernels: int
    kernels: int
    terminals: int
    last_activity: datetime.datetime | None


def parse_report(body: bytes) -> Report:
    """A server's answer, checked: the server is user code and may answer anything."""
    if len(body) > MAX_REPORT:
        raise BadReport(f"an answer of {len(body)} bytes (at most {MAX_REPORT})")
    try:
        data = json.loads(body)
    except ValueError:
        raise BadReport("an answer that is not JSON") from None
    if not isinstance(data, dict):
        raise BadReport("an answer that is not a JSON object")

    def count(name: str) -> int:
        value = data.get(name)
        if type(value) is not int or not 0 <= value <= _MAX_COUNT:
            raise BadReport(f"{name}: {value!r} is no count")
        return value

    busy, kernels, terminals = count("busy_kernels"), count("kernels"), count("terminals")
    last = data.get("last_activity")
    when = None
    if last is not None:
        try:
            if not isinstance(last, str) or len(last) > 64:
                raise ValueError
            when = datetime.datetime.fromisoformat(last.replace("Z", "+00:00"))
        except ValueError:
            raise BadReport(f"last_activity: {str(last)[:64]!r} is no time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
    return Report(busy, kernels, terminals, when)


# -- the server's side (runs in the user's server) ---------------------------------------
def report(serverapp: Any) -> dict[str, Any]:
    """What the server says of itself: its kernels, its terminals, its last activity."""
    kernels = serverapp.kernel_manager.list_kernels()
    terminals = serverapp.web_app.settings.get("terminal_manager")
    last = serverapp.web_app.last_activity()
    return {
        "busy_kernels": sum(1 for k in kernels if k.get("execution_state") in _BUSY),
        "kernels": len(kernels),
        "terminals": len(terminals.list()) if terminals is not None else 0,
        "last_activity": last.isoformat() if last else None,
    }


def _handler(serverapp: Any, key: str) -> type:
    from jupyter_server.auth.decorator import allow_unauthenticated
    from tornado import web

    class ActivityHandler(web.RequestHandler):
        """Answers the holder of the server's activity key, and nobody else; it is no
        Jupyter API handler, so asking is not activity."""

        @allow_unauthenticated
        def get(self) -> None:
            given = self.request.headers.get(HEADER, "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise web.HTTPError(403)
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.finish(json.dumps(report(serverapp)))

    return ActivityHandler


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "sandbox_spawner.activity"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join

    key = os.environ.pop(KEY_ENV, "")  # kernels and terminals need not inherit it
    if not key:
        serverapp.log.info("sandbox_spawner.activity: no %s: not answering", KEY_ENV)
        return
    from . import quiesce

    route = url_path_join(serverapp.base_url, PATH)
    serverapp.web_app.add_handlers(".*$", [
        (route, _handler(serverapp, key)),
        # The supervisor's, with the same key, before a hibernation (:mod:`.quiesce`).
        (url_path_join(serverapp.base_url, quiesce.PATH),
         quiesce.handler(serverapp, key, HEADER)),
    ])  # fmt: skip
