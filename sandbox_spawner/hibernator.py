"""The hibernator: a JupyterHub service that stops the servers nobody uses, kernels counted.

jupyterhub-idle-culler goes by the Hub's record of activity, which a kernel
running a long computation with no browser attached does not update: it culls
the busy kernel with its server (idle-culler #10, JupyterHub #1498). The
hibernator asks each server itself (:mod:`.activity`): at the server's own address,
with a key valid for that one question of that one server, never a credential of
the Hub's or the service's (a server is user code, and can log what it is sent). A
server is idle when

* none of its kernels is busy (or starting),
* no terminal is open,
* nothing happened for ``timeout`` seconds: no kernel ran or sent anything, no
  request reached the server, and the Hub saw no activity.

With ``freeze_after`` set, a server idle that long (and not yet ``timeout``) is first
frozen, where its supervisor can (:mod:`.freezing`, LocalSandboxSpawner as root): every
process of its sandbox stopped where it is, no CPU used, memory kept, and the next
request thaws it at once, kernels and their variables as they were. A frozen server is
not asked (it cannot answer); it stops once it has been idle ``timeout`` seconds,
counting from the last activity it had before it froze.

With ``strategy`` ``"hibernate"``, an idle server whose supervisor can (gVisor, on one
machine) is first saved to disk with its memory (:mod:`.hibernation`) and comes back
on the next visit with its kernels' variables; others, and any whose image cannot be
kept, are only stopped. Either way an idle server is stopped through the Hub API, which
for this project's spawners is hibernation, not loss: LocalSandboxSpawner and SandboxSpawner keep
the user's home (and the API token, ``will_resume``); the Hub starts the server again on the
user's next visit. Users, groups and profiles can be exempt; ``max_age``
hibernates even a server in use (never one with a busy kernel); ``dry_run``
only logs. A server that cannot be asked, or answers what is no report, is left
alone (and logged), until its ``max_age``. Servers are asked a few at a time, each
with a short timeout, so no server's answer (or silence) holds up the sweep.

It runs in the Hub service :mod:`sandbox_spawner.service`, which gives it its
options, its Hub API token and its metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from . import freezing
from .activity import HEADER, MAX_REPORT, BadReport, Report, parse_report

log = logging.getLogger("jupyter-sandbox-hibernator")
#: Servers asked at once, and the seconds each has to answer.
CONCURRENCY, ASK_TIMEOUT = 8, 10.0
#: A server is frozen only if the proxy carried nothing to or from it for this long (or
#: ``freeze_after``, if shorter): a request in flight is not held up. Its supervisor sees
#: every byte; the Hub's own record lags by minutes.
FREEZE_GUARD = 10.0
#: Seconds a server's supervisor has to save it to disk (its memory, at disk speed).
HIBERNATE_TIMEOUT = 600.0


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Verdict:
    idle: bool
    reason: str
    #: Seconds since the server's last activity, where that decided it.
    quiet: float | None = None
    last: datetime.datetime | None = None


class NotAsked(RuntimeError):
    """The server cannot be asked (it was started without a key, or answers no report)."""


@dataclass
class Hibernator:
    api_url: str
    api_token: str
    timeout: float = 3600
    #: Seconds without activity after which a server is frozen (0: never), where its
    #: supervisor can freeze it; it stops at ``timeout``.
    freeze_after: float = 0
    #: Seconds after which a server hibernates even if in use (0: never); a busy kernel
    #: still keeps it.
    max_age: float = 0
    exempt_users: set[str] = field(default_factory=set)
    exempt_groups: set[str] = field(default_factory=set)
    #: Profiles (``user_options["profile"]``) whose servers never hibernate.
    exempt_profiles: set[str] = field(default_factory=set)
    #: ``"stop"``: an idle server's processes end; ``"hibernate"``: where its supervisor
    #: can, its memory is saved to disk first, and restored on the next visit.
    strategy: str = "stop"
    #: Groups and profiles whose servers are stopped, never frozen nor hibernated with
    #: their memory (a GPU's memory, say, is too dear to hold for an idle server).
    unfrozen_groups: set[str] = field(default_factory=set)
    unfrozen_profiles: set[str] = field(default_factory=set)
    #: Log what would hibernate; stop nothing.
    dry_run: bool = False
    #: Temporary users (anonymous Binder launches) have names starting with this: their
    #: servers hibernate after ``temporary_timeout``, and a temporary user with no server
    #: running is deleted, home and all.
    temporary_prefix: str = ""
    temporary_timeout: float = 600
    metrics: Any = None
    _starts_seen: set[tuple[str, str, str]] = field(default_factory=set)
    _running: int = 0
    _frozen: int = 0
    _client: Any = None

    # -- the Hub (the service's token goes there, and only there) -------------------------
    async def _fetch(self, url: str, method: str = "GET") -> Any:
        assert url.startswith(self.api_url + "/"), url  # the token is the Hub's business
        response = await AsyncHTTPClient().fetch(HTTPRequest(
            url, method=method, headers={"Authorization": f"token {self.api_token}"},
            request_timeout=30, allow_nonstandard_methods=True, follow_redirects=False,
        ))  # fmt: skip
        return json.loads(response.body) if response.body else None

    async def users(self) -> list[dict[str, Any]]:
        """Every user, with their servers, hibernated (stopped) ones included, page by page."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await AsyncHTTPClient().fetch(HTTPRequest(
                f"{self.api_url}/users?include_stopped_servers=1&offset={offset}&limit=200",
                headers={"Authorization": f"token {self.api_token}",
                         "Accept": "application/jupyterhub-pagination+json"},
                request_timeout=30, follow_redirects=False,
            ))  # fmt: skip
            body = json.loads(page.body)
            items = body["items"] if isinstance(body, dict) else body
            found += items
            nxt = body.get("_pagination", {}).get("next") if isinstance(body, dict) else None
            if not nxt:
                return found
            offset = nxt["offset"]

    # -- one server (user code: a key for one question, and nothing else) ----------------
    async def ask(self, server: dict[str, Any]) -> Report:
        """What ``server`` (the Hub's model, with its spawner's state) says of itself."""
        where = (server.get("state") or {}).get("activity") or {}
        url, key = where.get("url"), where.get("key")
        if not (isinstance(url, str) and isinstance(key, str) and url.startswith("http")):
            raise NotAsked("it was started without an activity key (before this version "
                           "of the spawner?): it hibernates once restarted")  # fmt: skip
        if self._client is None:  # answers are small: a bigger one is refused, not read
            self._client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_REPORT,
                                           max_header_size=MAX_REPORT * 4)  # fmt: skip
        try:
            response = await self._client.fetch(HTTPRequest(
                url, headers={HEADER: key}, request_timeout=ASK_TIMEOUT,
                connect_timeout=ASK_TIMEOUT, follow_redirects=False, decompress_response=False,
            ))  # fmt: skip
        except HTTPClientError as exc:
            if exc.code == 404:
                raise NotAsked("it answered 404: is sandbox_spawner.activity loaded in the "
                               "server (its image has this project)?") from None
            raise NotAsked(str(exc) if exc.code == 599 else f"it answered {exc.code}") from None
        try:
            return parse_report(response.body)
        except BadReport as exc:
            raise NotAsked(f"it answered no report: {exc}") from None

    async def verdict(self, server: dict[str, Any], now: datetime.datetime,
                      timeout: float | None = None) -> Verdict:  # fmt: skip
        """Whether ``server`` (the Hub's server model) is idle, and why (not)."""
        timeout = self.timeout if timeout is None else timeout
        report = await self.ask(server)
        if report.busy_kernels:
            return Verdict(False, f"{report.busy_kernels} kernel(s) busy")
        if report.terminals:
            return Verdict(False, f"{report.terminals} terminal(s) open")
        times = [report.last_activity, parse_time(server.get("last_activity")),
                 parse_time(server.get("started"))]  # fmt: skip
        last = max((t for t in times if t is not None), default=None)
        if last is None:
            return Verdict(False, "no activity recorded yet")
        return self._by_time(server, last, now, timeout, "running for {age:.0f}s (max age), "
                             "no busy kernel", "active {quiet:.0f}s ago",
                             "idle for {quiet:.0f}s, no busy kernel, no terminal")  # fmt: skip

    def _by_time(self, server: dict[str, Any], last: datetime.datetime,
                 now: datetime.datetime, timeout: float, too_old: str, stays: str,
                 idle: str) -> Verdict:  # fmt: skip
        """Idle once ``timeout`` seconds passed since ``last``, or the server is past its
        max age; the reasons are the templates given (``{age}``, ``{quiet}``)."""
        started = parse_time(server.get("started"))
        age = (now - started).total_seconds() if started else 0
        if self.max_age and age > self.max_age:
            return Verdict(True, too_old.format(age=age))
        quiet = (now - last).total_seconds()
        if quiet < timeout:
            return Verdict(False, stays.format(quiet=quiet), quiet, last)
        return Verdict(True, idle.format(quiet=quiet), quiet, last)

    def frozen_verdict(self, server: dict[str, Any], status: dict[str, Any],
                       now: datetime.datetime, timeout: float | None = None,
                       ) -> Verdict:  # fmt: skip
        """Whether a frozen server has now been idle ``timeout`` seconds: since the last
        activity it had when it froze (nothing of it has run since, and any request
        would have thawed it), or the Hub's later record."""
        timeout = self.timeout if timeout is None else timeout
        times = [parse_time(server.get("last_activity")), parse_time(server.get("started"))]
        with contextlib.suppress(TypeError, ValueError):
            times.append(parse_time(status.get("last_activity")))
        last = max((t for t in times if t is not None), default=now)
        return self._by_time(server, last, now, timeout, "frozen, running for {age:.0f}s "
                             "(max age)", "frozen, idle for {quiet:.0f}s",
                             "frozen, idle for {quiet:.0f}s")  # fmt: skip

    def exempt(self, user: dict[str, Any], server: dict[str, Any] | None = None) -> bool:
        """Whether ``user``'s ``server`` never hibernates. Its profile is the one its spawner
        checked and recorded in its state (SandboxSpawner: one of its profile list), never
        what the user sent in ``user_options``: that is the user's to choose."""
        return user["name"] in self.exempt_users or _matches(
            user, server, self.exempt_groups, self.exempt_profiles)  # fmt: skip

    def freezes(self, user: dict[str, Any], server: dict[str, Any] | None = None) -> bool:
        """Whether ``user``'s ``server`` is frozen when idle (then stopped), or only stopped."""
        return bool(self.freeze_after) and not _matches(
            user, server, self.unfrozen_groups, self.unfrozen_profiles)  # fmt: skip

    def keeps_memory(self, user: dict[str, Any], server: dict[str, Any] | None = None) -> bool:
        """Whether ``user``'s ``server`` is hibernated with its memory before it stops."""
        return self.strategy == "hibernate" and not _matches(
            user, server, self.unfrozen_groups, self.unfrozen_profiles)  # fmt: skip

    # -- a sweep ----------------------------------------------------------------------------
    async def sweep(self) -> list[str]:
        """Check every ready server once; stop the idle ones. The servers stopped."""
        now = datetime.datetime.now(datetime.UTC)
        users = await self.users()
        self._observe(users)
        checks = []
        for user in users:
            try:  # one user's records (or a failed deletion) hold up nobody else's
                temporary = self._temporary(user)
                if temporary and await self._delete_if_done(user, now):
                    continue
                for name, server in (user.get("servers") or {}).items():
                    if not server.get("ready") or server.get("pending"):
                        continue
                    if self.exempt(user, server):
                        continue
                    timeout = self.temporary_timeout if temporary else None
                    checks.append((user["name"], name, server, timeout,
                                   self.freezes(user, server),
                                   self.keeps_memory(user, server)))  # fmt: skip
            except Exception:
                log.exception("cannot check the servers of %s", user.get("name"))
                self._count("errors")
        gate = asyncio.Semaphore(CONCURRENCY)

        async def check(user: str, name: str, server: dict[str, Any], timeout: float | None,
                        freezes: bool, keeps: bool) -> str | None:  # fmt: skip
            async with gate:
                return await self._check(user, name, server, timeout, now, freezes, keeps)

        self._frozen = 0
        stopped = await asyncio.gather(*(check(*c) for c in checks))
        if self.metrics is not None:
            self.metrics["servers"].labels("running").set(self._running - self._frozen)
            self.metrics["servers"].labels("frozen").set(self._frozen)
        return [label for label in stopped if label]

    async def _freezer_status(self, label: str, freezer: Any) -> dict[str, Any] | None:
        """What the server's supervisor says (frozen or running); None where it has no
        freezer or does not answer (then the server is asked as any other)."""
        if not _is_freezer(freezer):
            return None  # none (Kubernetes, a server started before freezing), or not one
        try:
            status = await freezing.request(freezer, {"do": "status", "take_thaws": True})
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("cannot reach the supervisor of %s: %s", label, exc)
            return None
        thaws = status.get("thaws")
        if self.metrics is not None and isinstance(thaws, list):
            for took in thaws[:100]:
                if isinstance(took, int | float) and 0 <= took < 3600:
                    self.metrics["resumes"].labels("freeze").observe(took)
        return status

    async def _freeze(self, label: str, freezer: str, verdict: Verdict) -> None:
        if self.dry_run:
            log.info("would freeze %s (dry run): %s", label, verdict.reason)
            return
        try:
            answer = await freezing.request(freezer, {
                "do": "freeze", "quiet": min(self.freeze_after, FREEZE_GUARD),
                "last_activity": verdict.last.isoformat() if verdict.last else None,
            })  # fmt: skip
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("cannot freeze %s: %s", label, exc)
            return
        if answer.get("ok"):
            log.info("froze %s: %s", label, verdict.reason)
            self._count("freezes")
        else:
            log.info("%s not frozen: %s", label, str(answer.get("reason"))[:200])

    async def _hibernate_memory(self, label: str, freezer: Any) -> None:
        """Have the server's supervisor save it to disk with its memory (it then ends);
        where it cannot, the stop that follows is a plain one."""
        if not _is_freezer(freezer):
            return
        try:
            answer = await freezing.request(freezer, {"do": "hibernate"}, HIBERNATE_TIMEOUT)
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("cannot hibernate %s with its memory: %s; stopping it", label, exc)
            return
        if answer.get("ok"):
            size = answer.get("bytes")
            mib = f"{size / 2**20:.0f} MiB" if isinstance(size, int) else "?"
            log.info("%s hibernated with its memory (an image of %s)", label, mib)
            self._count("memory_hibernations")
        else:
            log.info("%s not hibernated with its memory: %s; stopping it", label,
                     str(answer.get("reason"))[:300])  # fmt: skip

    async def _check(self, user: str, name: str, server: dict[str, Any],
                     timeout: float | None, now: datetime.datetime,
                     freezes: bool = False, keeps: bool = False) -> str | None:  # fmt: skip
        """Ask one server; stop it if idle. Its label if it was (or would be) stopped."""
        label = f"{user}/{name}" if name else user
        freezer = (server.get("state") or {}).get("freezer")
        # Asked even with freezing off: one frozen before the options changed still stops.
        status = await self._freezer_status(label, freezer)
        try:
            if status is not None and status.get("state") == "frozen":
                self._frozen += 1
                verdict = self.frozen_verdict(server, status, now, timeout)
            else:
                verdict = await self.verdict(server, now, timeout)
        except Exception as exc:  # unreachable, or an error: never stop on doubt ...
            log.warning("cannot tell whether %s is idle: %s", label, exc)
            self._count("errors")
            started = parse_time(server.get("started"))
            age = (now - started).total_seconds() if started else 0
            if not (self.max_age and age > self.max_age):
                return None
            # ... but past its max age: a server that does not say whether a kernel is
            # busy (broken, or made to say nothing) does not run on for ever.
            verdict = Verdict(True, f"running for {age:.0f}s (max age), and it does not "
                              "say whether a kernel is busy")  # fmt: skip
        else:
            self._count("checks")
        if not verdict.idle:
            log.debug("%s stays: %s", label, verdict.reason)
            frozen = status is not None and status.get("state") == "frozen"
            if (freezes and status is not None and not frozen and verdict.quiet is not None
                    and verdict.quiet >= self.freeze_after):  # fmt: skip
                await self._freeze(label, freezer, verdict)
            return None
        if self.dry_run:
            log.info("would hibernate %s (dry run): %s", label, verdict.reason)
            return label
        log.info("hibernating %s: %s", label, verdict.reason)
        if keeps:
            await self._hibernate_memory(label, freezer)
        path = f"/users/{quote(user)}/server"
        if name:
            path = f"/users/{quote(user)}/servers/{quote(name)}"
        await self._fetch(self.api_url + path, method="DELETE")
        self._count("hibernations")
        return label

    def _temporary(self, user: dict[str, Any]) -> bool:
        return bool(self.temporary_prefix) and user["name"].startswith(self.temporary_prefix)

    async def _delete_if_done(self, user: dict[str, Any], now: datetime.datetime) -> bool:
        """Delete a temporary user whose server has stopped, or who has had none for ten
        minutes (a launch makes its server within minutes of the user)."""
        servers = (user.get("servers") or {}).values()
        if any(s.get("ready") or s.get("pending") for s in servers):
            return False
        created = parse_time(user.get("created"))
        # Its server ran, and stopped: a server that never started is listed as stopped
        # too (a user just made by a launch has one), but has no start record.
        launched = any(s.get("stopped") and (s.get("state") or {}).get("last_start")
                       for s in servers)  # fmt: skip
        if not launched and (created is None or (now - created).total_seconds() < 600):
            return False  # perhaps a launch still making its server
        if self.dry_run:
            log.info("would delete the temporary user %s (dry run)", user["name"])
            return True
        log.info("deleting the temporary user %s: its server has stopped", user["name"])
        await self._fetch(f"{self.api_url}/users/{quote(user['name'])}", method="DELETE")
        return True

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics[what].inc()

    def _observe(self, users: list[dict[str, Any]]) -> None:
        """Servers running and hibernated; each new start's duration (from the spawner's
        state, see :mod:`.starts`)."""
        if self.metrics is None:
            return
        running = hibernated = with_memory = 0
        for user in users:
            for name, server in (user.get("servers") or {}).items():
                if server.get("stopped") and (server.get("state") or {}).get("image_kept"):
                    with_memory += 1  # its memory's image kept too
                elif server.get("stopped"):
                    hibernated += 1  # stopped, its state (Sandbox, home, token) kept
                else:
                    running += 1
                start = (server.get("state") or {}).get("last_start")
                key = (user["name"], name, (start or {}).get("at", ""))
                if start and key not in self._starts_seen:
                    self._starts_seen.add(key)
                    kind = "resume" if start.get("resumed") else "first"
                    self.metrics["starts"].labels(kind).observe(start["seconds"])
                    if start.get("resumed"):
                        strategy = "hibernate" if start.get("strategy") == "hibernate" else "stop"
                        self.metrics["resumes"].labels(strategy).observe(start["seconds"])
        self._running = running  # frozen ones are told apart as they are checked
        self.metrics["servers"].labels("hibernated").set(hibernated)
        self.metrics["servers"].labels("hibernated-with-memory").set(with_memory)


def _is_freezer(path: Any) -> bool:
    """Whether the spawner's state names a supervisor's control socket."""
    return (isinstance(path, str) and os.path.isabs(path)
            and os.path.basename(path) == freezing.SOCKET)  # fmt: skip


def _matches(user: dict[str, Any], server: dict[str, Any] | None, groups: set[str],
             profiles: set[str]) -> bool:  # fmt: skip
    """Whether ``user`` is in one of ``groups`` or ``server``'s recorded profile is one of
    ``profiles``."""
    profile = ((server or {}).get("state") or {}).get("profile")
    theirs = {g for g in user.get("groups") or [] if isinstance(g, str)}
    return bool(groups & theirs) or (isinstance(profile, str) and profile in profiles)


def metrics() -> dict[str, Any]:
    """The hibernator's Prometheus metrics (in the default registry)."""
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "checks": Counter("jupyter_sandbox_hibernator_checks", "servers asked whether idle"),
        "errors": Counter("jupyter_sandbox_hibernator_errors", "servers that could not be asked"),
        "hibernations": Counter("jupyter_sandbox_hibernations", "idle servers stopped"),
        "freezes": Counter("jupyter_sandbox_freezes", "idle servers frozen"),
        "memory_hibernations": Counter("jupyter_sandbox_memory_hibernations",
                                       "idle servers saved to disk with their memory"),
        "servers": Gauge("jupyter_sandbox_servers", "users' servers by state", ["state"]),
        "starts": Histogram(
            "jupyter_sandbox_start_seconds", "from a server's start to its URL, by kind "
            "(first start, or resume of a hibernated server)", ["kind"],
            buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300),
        ),
        "resumes": Histogram(
            "jupyter_sandbox_resume_seconds", "from a request for an idle server to its "
            "answer, by how it had been idle: frozen (the thaw), hibernated with its memory "
            "(the restore) or stopped (the start)",
            ["strategy"], buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.5, 1, 2, 5, 13, 34, 120),
        ),
    }  # fmt: skip


async def run(hibernator: Hibernator, interval: float, stop: asyncio.Event) -> None:
    """Sweep every ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            await hibernator.sweep()
        except Exception:
            log.exception("sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The hibernator's options (the service's command line)."""
    parser.add_argument("--hibernate", action="store_true",
                        help="stop (hibernate) servers that are not in use")  # fmt: skip
    # The old switch (the hibernator asked servers through the proxy): --hibernate now.
    parser.add_argument("--proxy-url", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds without activity before a server hibernates")  # fmt: skip
    parser.add_argument("--freeze-after", type=float, default=0,
                        help="seconds without activity before a server is frozen (its "
                        "processes stopped, memory kept, thawed by the next request; 0: "
                        "never); it hibernates at --timeout")  # fmt: skip
    parser.add_argument("--max-age", type=float, default=0,
                        help="seconds after which a server hibernates even if in use (a busy "
                        "kernel still keeps it; 0: never)")  # fmt: skip
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between checks (timeout/10, at most 60)")  # fmt: skip
    parser.add_argument("--exempt-users", default="", help="never hibernated (comma-separated)")
    parser.add_argument("--exempt-groups", default="", help="never hibernated (comma-separated)")
    parser.add_argument("--exempt-profiles", default="",
                        help="profiles never hibernated (comma-separated)")  # fmt: skip
    parser.add_argument("--strategy", choices=("stop", "hibernate"), default="stop",
                        help="what hibernating an idle server at --timeout is: stop (its "
                        "processes end, its files stay) or hibernate (gVisor servers on one "
                        "machine: memory saved to disk first, kernels restored with their "
                        "variables on the next visit; others stop)")  # fmt: skip
    parser.add_argument("--never-freeze-groups", default="",
                        help="groups whose servers are stopped, never frozen nor hibernated "
                        "with their memory (comma-separated)")  # fmt: skip
    parser.add_argument("--never-freeze-profiles", default="",
                        help="profiles whose servers are stopped, never frozen nor "
                        "hibernated with their memory")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true",
                        help="log what would hibernate, stop nothing")  # fmt: skip


def from_args(args: argparse.Namespace, metrics: Any = None) -> tuple[Hibernator, float]:
    """The hibernator ``args`` describe (the Hub API from the service's environment), and
    its interval."""

    def names(text: str) -> set[str]:
        return {n for n in text.split(",") if n}

    if args.freeze_after < 0:
        raise SystemExit(f"--freeze-after={args.freeze_after:g}: seconds, or 0 (never freeze)")
    if args.freeze_after and args.freeze_after >= args.timeout:
        log.warning("--freeze-after=%g is not less than --timeout=%g: servers hibernate "
                    "before they would freeze, so none is frozen", args.freeze_after,
                    args.timeout)  # fmt: skip
        args.freeze_after = 0

    hibernator = Hibernator(
        api_url=os.environ["JUPYTERHUB_API_URL"].rstrip("/"),
        api_token=os.environ["JUPYTERHUB_API_TOKEN"],
        timeout=args.timeout,
        freeze_after=args.freeze_after,
        strategy=args.strategy,
        max_age=args.max_age,
        exempt_users=names(args.exempt_users),
        exempt_groups=names(args.exempt_groups),
        exempt_profiles=names(args.exempt_profiles),
        unfrozen_groups=names(args.never_freeze_groups),
        unfrozen_profiles=names(args.never_freeze_profiles),
        dry_run=args.dry_run,
        metrics=metrics,
    )
    first = min(args.timeout, args.freeze_after or args.timeout)
    return hibernator, args.interval or min(60.0, max(1.0, first / 10))
