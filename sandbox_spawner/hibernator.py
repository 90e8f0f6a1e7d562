"""The hibernator: a JupyterHub service that stops the servers nobody uses, kernels counted.

jupyterhub-idle-culler goes by the Hub's record of activity, which a kernel
running a long computation with no browser attached does not update: it culls
the busy kernel with its server (idle-culler #10, JupyterHub #1498). The
hibernator asks each server itself, through the proxy with its own token
(``?no_track_activity=1``, so that asking is not activity). A server is idle
when

* none of its kernels is busy (or starting),
* no terminal is open,
* nothing happened for ``timeout`` seconds: no kernel ran or sent anything, no
  request reached the server, and the Hub saw no activity.

An idle server is stopped through the Hub API, which for this project's
spawners is hibernation, not loss: LocalSandboxSpawner keeps the user's home
(and its API token, ``will_resume``); the Hub starts the server again on the
user's next visit. Users and groups can be exempt. A server that cannot be
asked is left alone (and logged). Prometheus metrics on ``--metrics-port``.

    python -m sandbox_spawner.hibernator --proxy-url http://127.0.0.1:8000 \\
        [--timeout 3600] [--interval 60] [--exempt-users a,b] [--exempt-groups staff]

Run as a Hub-managed service (``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_API_URL``
from the Hub) with the scopes ``list:users``, ``read:users``,
``read:servers``, ``delete:servers`` and ``access:servers``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

log = logging.getLogger("jupyter-sandbox-hibernator")
_BUSY = {"busy", "starting"}


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Verdict:
    idle: bool
    reason: str


@dataclass
class Hibernator:
    api_url: str
    api_token: str
    proxy_url: str
    timeout: float = 3600
    exempt_users: set[str] = field(default_factory=set)
    exempt_groups: set[str] = field(default_factory=set)
    metrics: Any = None

    # -- the Hub ------------------------------------------------------------------------------
    async def _fetch(self, url: str, method: str = "GET") -> Any:
        response = await AsyncHTTPClient().fetch(HTTPRequest(
            url, method=method, headers={"Authorization": f"token {self.api_token}"},
            request_timeout=30, allow_nonstandard_methods=True,
        ))  # fmt: skip
        return json.loads(response.body) if response.body else None

    async def users(self) -> list[dict[str, Any]]:
        """Every user with a ready server, page by page."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await AsyncHTTPClient().fetch(HTTPRequest(
                f"{self.api_url}/users?state=ready&offset={offset}&limit=200",
                headers={"Authorization": f"token {self.api_token}",
                         "Accept": "application/jupyterhub-pagination+json"},
                request_timeout=30,
            ))  # fmt: skip
            body = json.loads(page.body)
            items = body["items"] if isinstance(body, dict) else body
            found += items
            nxt = body.get("_pagination", {}).get("next") if isinstance(body, dict) else None
            if not nxt:
                return found
            offset = nxt["offset"]

    # -- one server -------------------------------------------------------------------------
    async def verdict(self, server: dict[str, Any], now: datetime.datetime) -> Verdict:
        """Whether ``server`` (the Hub's server model) is idle, and why (not)."""
        base = self.proxy_url.rstrip("/") + server["url"]

        async def get(path: str) -> Any:
            return await self._fetch(f"{base}api/{path}?no_track_activity=1")

        status = await get("status")
        kernels = await get("kernels")
        try:
            terminals = await get("terminals")
        except HTTPClientError as exc:
            if exc.code != 404:  # terminals disabled
                raise
            terminals = []
        busy = [k for k in kernels if k.get("execution_state") in _BUSY]
        if busy:
            return Verdict(False, f"{len(busy)} kernel(s) busy")
        if terminals:
            return Verdict(False, f"{len(terminals)} terminal(s) open")
        times = [parse_time(k.get("last_activity")) for k in kernels]
        times += [parse_time(status.get("last_activity")), parse_time(server.get("last_activity")),
                  parse_time(server.get("started"))]  # fmt: skip
        last = max((t for t in times if t is not None), default=None)
        if last is None:
            return Verdict(False, "no activity recorded yet")
        quiet = (now - last).total_seconds()
        if quiet < self.timeout:
            return Verdict(False, f"active {quiet:.0f}s ago")
        return Verdict(True, f"idle for {quiet:.0f}s, no busy kernel, no terminal")

    def exempt(self, user: dict[str, Any]) -> bool:
        return user["name"] in self.exempt_users or bool(
            self.exempt_groups & set(user.get("groups") or [])
        )

    # -- a sweep ----------------------------------------------------------------------------
    async def sweep(self) -> list[str]:
        """Check every ready server once; stop the idle ones. The servers stopped."""
        now = datetime.datetime.now(datetime.UTC)
        stopped: list[str] = []
        for user in await self.users():
            if self.exempt(user):
                continue
            for name, server in (user.get("servers") or {}).items():
                if not server.get("ready") or server.get("pending"):
                    continue
                label = f"{user['name']}/{name}" if name else user["name"]
                try:
                    verdict = await self.verdict(server, now)
                except Exception as exc:  # unreachable, or an error: never stop on doubt
                    log.warning("cannot tell whether %s is idle: %s", label, exc)
                    self._count("errors")
                    continue
                self._count("checks")
                if not verdict.idle:
                    log.debug("%s stays: %s", label, verdict.reason)
                    continue
                log.info("hibernating %s: %s", label, verdict.reason)
                path = f"/users/{quote(user['name'])}/server"
                if name:
                    path = f"/users/{quote(user['name'])}/servers/{quote(name)}"
                await self._fetch(self.api_url + path, method="DELETE")
                self._count("hibernations")
                stopped.append(label)
        return stopped

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics[what].inc()


def _metrics(port: int) -> dict[str, Any]:
    from prometheus_client import Counter, start_http_server

    start_http_server(port, addr="127.0.0.1")
    return {
        "checks": Counter("jupyter_sandbox_hibernator_checks", "servers asked whether idle"),
        "errors": Counter("jupyter_sandbox_hibernator_errors", "servers that could not be asked"),
        "hibernations": Counter("jupyter_sandbox_hibernations", "idle servers stopped"),
    }


async def run(hibernator: Hibernator, interval: float) -> None:
    while True:
        try:
            await hibernator.sweep()
        except Exception:
            log.exception("sweep failed")
        await asyncio.sleep(interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox_spawner.hibernator")
    parser.add_argument("--proxy-url", required=True, help="where the Hub's proxy listens")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds without activity before a server hibernates")  # fmt: skip
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between checks (timeout/10, at most 60)")  # fmt: skip
    parser.add_argument("--exempt-users", default="", help="never hibernated (comma-separated)")
    parser.add_argument("--exempt-groups", default="", help="never hibernated (comma-separated)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hibernator %(message)s")
    hibernator = Hibernator(
        api_url=os.environ["JUPYTERHUB_API_URL"].rstrip("/"),
        api_token=os.environ["JUPYTERHUB_API_TOKEN"],
        proxy_url=args.proxy_url,
        timeout=args.timeout,
        exempt_users={u for u in args.exempt_users.split(",") if u},
        exempt_groups={g for g in args.exempt_groups.split(",") if g},
        metrics=_metrics(args.metrics_port) if args.metrics_port else None,
    )
    interval = args.interval or min(60.0, max(1.0, args.timeout / 10))
    asyncio.run(run(hibernator, interval))


if __name__ == "__main__":
    main()
