"""A Binder launch, from a link to a running server, told as BinderHub's event stream.

:meth:`Launcher.launch` yields events ``{"phase", "message", ...}``:

* ``waiting``: the launch is accepted (or waits for another launch of the commit);
* ``fetching``: the ref is resolved to a commit, the repository fetched;
* ``building``: the environment is prepared (:mod:`.prepare`), with its log lines,
  or found prepared (``"cached": true``: this commit's second launch prepares nothing);
* ``launching``: the user's server for the repository starts (the Hub's spawn
  progress, relayed) or is found running;
* ``ready`` with ``url`` (and ``token`` for a temporary user) the browser goes to, or
  ``failed`` with ``reason`` (``unknown-provider``, ``malformed``,
  ``disallowed-host``, ``unreachable``, ``unresolvable-ref``, ``bad-repository``,
  ``preparation-failed``, ``too-many-launches``, ``launch-failed``) and a message
  a person can act on.

Who launches: a logged-in user gets a named server of their own per repository
(its home their persistent copy); without login, when the deployment allows it, a
temporary user made for this launch (deleted after idle by the hibernator). Limits:
launches in flight per user, servers running per repository, and for launches without
login temporary users at once and launches per client (:mod:`.admission`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..hub_api import HubAPI, HubAPIError
from . import admission, cache, refs
from .environment import BadRepository
from .links import BadLink, LinkPolicy, RepoLink, launch_path
from .prepare import PreparationFailed, Preparer, repo_key
from .server import OPTION

log = logging.getLogger("jupyter-sandbox-binder")


class LaunchFailed(RuntimeError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class LaunchSettings:
    #: Visitors who are not logged in launch as a temporary user (else they log in first).
    anonymous: bool = False
    #: Temporary users' names start with this (the hibernator deletes them after idle).
    anonymous_prefix: str = "binder-"
    #: Servers of one repository running at once, all users together (0: no limit).
    per_repo_limit: int = 0
    #: Launches one user has in flight at once (0: no limit).
    per_user_limit: int = 2
    #: Temporary users at once: running, starting, or being made (0: no limit).
    anonymous_limit: int = 20
    #: Launches without login one client may start per ``client_window`` seconds (0: no
    #: limit).
    client_launches: int = 10
    client_window: float = 600
    #: Where the Hub's proxy connects from: the only peers whose X-Forwarded-For is read.
    trusted_proxies: tuple[str, ...] = admission.LOOPBACK
    #: Seconds a server has to start.
    launch_timeout: float = 300
    #: The prepared commits' cache holds at most this (least recently launched out first).
    cache_bytes: int = 20 << 30
    #: The profile (``user_options["profile"]``) launched servers get; empty: the default.
    profile: str = ""


#: The launches in flight of visitors who are not logged in, counted under this name.
ANONYMOUS = "(a temporary user)"


def server_name(link: RepoLink) -> str:
    """The user's named server for a repository: a valid JupyterHub server name, stable."""
    base = re.sub(r"[^a-z0-9]+", "-", link.name.lower()).strip("-")[:14].strip("-") or "repo"
    digest = hashlib.sha256(link.url.encode()).hexdigest()[:8]
    return f"b-{base}-{digest}"


class Launcher:
    def __init__(self, policy: LinkPolicy, preparer: Preparer, hub: HubAPI,
                 settings: LaunchSettings | None = None):  # fmt: skip
        self.policy, self.preparer, self.hub = policy, preparer, hub
        self.settings = settings or LaunchSettings()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self.trusted_proxies = admission.networks(self.settings.trusted_proxies)
        self._rate = admission.ClientRate(self.settings.client_launches,
                                          self.settings.client_window)  # fmt: skip
        self._admitting = asyncio.Lock()
        #: Temporary users made by launches in flight (the Hub lists them too).
        self._temporary: set[str] = set()

    async def start(self) -> None:
        """Start what launches need beside the pages (on Kubernetes, the egress proxy)."""
        if self.preparer.runner is not None:
            await self.preparer.runner.start()

    def check(self, provider: str, spec: str, query: dict[str, str]) -> tuple[RepoLink, str]:
        """The link and the path inside the server; :class:`BadLink` at once for a bad one."""
        return self.policy.parse(provider, spec), launch_path(**query)

    async def launch(self, provider: str, spec: str, query: dict[str, str], user: str | None,
                     client: str = "") -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """The launch's events; ``user`` None: a visitor without login, from ``client``
        (:func:`.admission.client_of`)."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def emit(phase: str, message: str, **extra: Any) -> None:
            queue.put_nowait({"phase": phase, "message": message, **extra})

        async def run() -> None:
            try:
                await self._launch(provider, spec, query, user, client, emit)
            except (BadLink, LaunchFailed) as exc:
                emit("failed", str(exc), reason=exc.reason)
            except BadRepository as exc:
                emit("failed", str(exc), reason="bad-repository")
            except PreparationFailed as exc:
                emit("failed", str(exc), reason="preparation-failed")
            except Exception as exc:  # the page must say something, whatever broke
                log.exception("launch of %s/%s failed", provider, spec)
                emit("failed", f"the launch failed: {exc}", reason="launch-failed")
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if not task.done():
                task.cancel()

    async def _launch(self, provider: str, spec: str, query: dict[str, str],
                      user: str | None, client: str, emit: Any) -> None:  # fmt: skip
        link, path = self.check(provider, spec, query)
        emit("waiting", f"Launching {link.url} at {link.ref}")
        if user is None and not self.settings.anonymous:
            raise LaunchFailed("launch-failed", "log in to launch repositories here")
        who = user or ANONYMOUS
        limit = self.settings.per_user_limit
        if user is None:
            await self._admit(client)  # counted in flight from here
        elif limit and self._in_flight[user] >= limit:
            raise LaunchFailed("too-many-launches", f"{user} has {limit} launches in progress; "
                               "wait for one to finish")  # fmt: skip
        else:
            self._in_flight[user] += 1
        try:
            await self._launch_for(link, path, user, emit)
        finally:
            self._in_flight[who] -= 1

    async def _admit(self, client: str) -> None:
        """Count a launch without login in flight, or refuse it: too many from ``client``
        lately, or as many temporary users as the deployment keeps at once."""
        settings = self.settings
        if not self._rate.allow(client):
            raise LaunchFailed("too-many-launches", "too many launches from your address "
                               f"({settings.client_launches} in {settings.client_window:g}s, "
                               "the limit here); try again later, or log in")  # fmt: skip
        async with self._admitting:  # one count at a time: two launches never both fit
            if settings.anonymous_limit:
                users = await self.hub.request("GET", "/users?state=active&limit=1000")
                running = {u["name"] for u in users
                           if u["name"].startswith(settings.anonymous_prefix)}  # fmt: skip
                at_once = len(running - self._temporary) + self._in_flight[ANONYMOUS]
                if at_once >= settings.anonymous_limit:
                    raise LaunchFailed("too-many-launches", f"{at_once} temporary users are "
                                       "running, as many as this deployment runs at once; try "
                                       "again later, or log in")  # fmt: skip
            self._in_flight[ANONYMOUS] += 1

    async def _launch_for(self, link: RepoLink, path: str, user: str | None, emit: Any) -> None:
        commit = await refs.resolve(link)
        emit("fetching", f"{link.ref} is commit {commit}")
        prepared, cached = await self.preparer.prepare(link, commit, emit)
        cache.touch(prepared)
        if cached:
            emit("building", f"Using the environment prepared for {commit[:12]} (cached: "
                 "nothing to prepare)", cached=True)  # fmt: skip
        else:
            await self._bound_cache(prepared.path)
        name = server_name(link)
        await self._check_repo_limit(name, user)
        anonymous = user is None
        if anonymous:
            user = await self._temporary_user()
        options: dict[str, Any] = {
            OPTION: {"repo": repo_key(link.url), "commit": commit, "anonymous": anonymous},
            "binder_repo": link.url}  # fmt: skip
        if self.settings.profile:
            options["profile"] = self.settings.profile
        try:
            url = await self._start(user, name, options, emit)
            if not url.startswith("/") or url.startswith("//"):  # the Hub's own path
                raise RuntimeError(f"the Hub gave the server's address as {url[:100]!r}")
            ready: dict[str, Any] = {"url": url + path}
            if anonymous:
                ready["token"] = await self._token(user)
                ready["url"] += ("&" if "?" in path else "?") + f"token={ready['token']}"
        except BaseException:  # failed, or the page went away: cancelled
            if anonymous:  # nothing of a failed temporary launch stays
                with contextlib.suppress(Exception):
                    await self.hub.request("DELETE", f"/users/{quote(user, safe='')}")
            raise
        finally:  # running now (the Hub counts it), or gone
            self._temporary.discard(user)
        emit("ready", f"{link.url} is running; opening {path or 'its server'}", **ready)

    async def _bound_cache(self, launching: Path) -> None:
        users = await self.hub.request("GET", "/users?state=active&limit=1000")
        keep = cache.in_use(users, self.preparer.cache_root) | {launching}
        # It measures every prepared commit (any number of files): off the event loop.
        removed = await asyncio.to_thread(cache.evict, self.preparer.cache_root,
                                          self.settings.cache_bytes, keep)  # fmt: skip
        for entry in removed:
            log.info("removed the prepared commit %s (the cache's bound)", entry)

    async def _check_repo_limit(self, name: str, user: str | None) -> None:
        limit = self.settings.per_repo_limit
        if not limit:
            return
        users = await self.hub.request("GET", "/users?state=active&limit=1000")
        running = [u["name"] for u in users if name in (u.get("servers") or {})]
        if user in running:
            return  # reopening one's own running server is no new launch
        if len(running) >= limit:
            raise LaunchFailed("too-many-launches", f"this repository has {limit} servers "
                               "running, its limit here; try again later")  # fmt: skip

    async def _temporary_user(self) -> str:
        name = f"{self.settings.anonymous_prefix}{secrets.token_hex(6)}"
        self._temporary.add(name)
        await self.hub.request("POST", f"/users/{name}")
        return name

    async def _token(self, user: str) -> str:
        body = {"note": "Binder launch", "expires_in": 7 * 24 * 3600,
                "scopes": [f"access:servers!user={user}"]}  # fmt: skip
        return (await self.hub.request("POST", f"/users/{quote(user, safe='')}/tokens", body))[
            "token"]  # fmt: skip

    async def _start(self, user: str, name: str, options: dict[str, Any], emit: Any) -> str:
        """Start (or find running) ``user``'s server ``name``; its URL."""
        quser, qname = quote(user, safe=""), quote(name, safe="")
        model = await self.hub.user(user) or {}
        server = (model.get("servers") or {}).get(name)
        deadline = asyncio.get_running_loop().time() + self.settings.launch_timeout
        while server and server.get("pending") == "stop":  # hibernating: start it after
            if asyncio.get_running_loop().time() > deadline:
                raise LaunchFailed("launch-failed", "the server did not finish stopping")
            await asyncio.sleep(0.5)
            model = await self.hub.user(user) or {}
            server = (model.get("servers") or {}).get(name)
            if server and not server.get("pending") and not server.get("ready"):
                server = None  # stopped
        if server and server.get("ready"):
            emit("launching", "Your server for this repository is running")
            return server["url"]
        if not server or not server.get("pending"):
            emit("launching", f"Starting a server for {user}")
            try:
                await self.hub.request("POST", f"/users/{quser}/servers/{qname}", options)
            except HubAPIError as exc:
                if exc.code != 400 or "already" not in str(exc):
                    message = f"the server could not start: {exc}"
                    raise LaunchFailed("launch-failed", message) from None
        async for event in self.hub.progress(user, name, self.settings.launch_timeout):
            if event.get("failed"):
                message = f"the server did not start: {event.get('message')}"
                raise LaunchFailed("launch-failed", message)
            if event.get("message"):
                emit("launching", event["message"])
        model = await self.hub.user(user) or {}
        server = (model.get("servers") or {}).get(name)
        if not server or not server.get("ready"):
            raise LaunchFailed("launch-failed", "the server did not start within "
                               f"{self.settings.launch_timeout:g}s")  # fmt: skip
        return server["url"]
