"""The Hub service ``sandbox-service``: the controller, the hibernator and their metrics.

One process, started by the Hub as a managed service, so that a sandboxed Hub
needs nothing installed beside it:

* **the Agent Sandbox controller** (``--controller``, Kubernetes only),
  in-process and leader-elected: a second Hub replica's service stays passive
  until the leader's lease lapses;
* **the hibernator** (:mod:`.hibernator`, with ``--hibernate``): stops servers
  with no busy kernel, no open terminal and no recent activity; the spawners
  (LocalSandboxSpawner, SandboxSpawner) make a stop a hibernation. It asks each
  server with that server's activity key (:mod:`.activity`): the service's own token
  never leaves for a user's server. With the controller, it too runs in one replica
  at a time, on a Lease of its own (:data:`HIBERNATOR_LEASE`), so each decision is
  taken once;
* **metrics** on the service's URL at ``/metrics`` (Prometheus text): servers
  running and hibernated, hibernations, start and resume durations, and the
  controller's own;
* **Binder links** (``--binder-links``, :mod:`.binder.web`): ``/v2/...`` on the
  service's URL opens a repository, running, in a sandbox.

Its Hub role (:data:`HUB_SCOPES`, :func:`hub_role`) needs ``list:users``,
``read:users``, ``read:servers``, ``admin:server_state`` (the spawners' start
records, and each server's activity key and address) and ``delete:servers``
(hibernate).

    python -m sandbox_spawner.service --hibernate --timeout 3600 \\
        [--controller --namespace jhub] [--exempt-profiles gpu] [--dry-run]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

from tornado import web

from . import hibernator

log = logging.getLogger("jupyter-sandbox-service")
#: The service's Hub role: list servers, read their spawners' state (start records, each
#: server's activity key and address), stop (hibernate) them. Nothing else: no access to
#: users' servers (it asks them with their own activity keys, :mod:`.activity`).
HUB_SCOPES = ["list:users", "read:users", "read:servers", "admin:server_state",
              "delete:servers"]  # fmt: skip


#: With Binder links: start users' servers; with anonymous launches, make and delete
#: temporary users and give each a token for its server.
BINDER_SCOPES = ["servers"]
ANONYMOUS_SCOPES = ["admin:users", "tokens"]


def hub_role(service: str = "sandbox-service", binder: bool = False,
             anonymous: bool = False) -> dict:  # fmt: skip
    """The ``c.JupyterHub.load_roles`` entry for the service named ``service``."""
    scopes = [*HUB_SCOPES, *(BINDER_SCOPES if binder else []),
              *(ANONYMOUS_SCOPES if binder and anonymous else [])]  # fmt: skip
    return {"name": service, "services": [service], "scopes": scopes}


class MetricsHandler(web.RequestHandler):
    def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(REGISTRY))


class StatusHandler(web.RequestHandler):
    def initialize(self, status: dict) -> None:
        self.status = status

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.status))


def serve(url: str, status: dict, launcher: object | None = None) -> None:
    """The service's pages on ``url`` (``JUPYTERHUB_SERVICE_URL``), under its prefix."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/").rstrip("/")
    routes: list = []
    if launcher is not None:
        from .binder import web as binder_web

        routes = binder_web.routes(launcher, prefix)  # type: ignore[arg-type]
    app = web.Application([
        (rf"{prefix}/metrics", MetricsHandler),
        (r"/metrics", MetricsHandler),  # Prometheus scrapes the service directly
        (rf"{prefix}/?", StatusHandler, {"status": status}),
        *routes,
    ], cookie_secret=secrets.token_bytes(32))  # fmt: skip
    where = urlparse(url)
    app.listen(where.port or 80, address=where.hostname or "127.0.0.1")
    log.info("serving /metrics on %s", url)


#: The Lease the replicas' hibernators take turns on (the controller has its own).
HIBERNATOR_LEASE = "sandbox-hibernator"


async def while_leading(args: argparse.Namespace, lease: str,
                        work: Callable[[], Awaitable[None]],
                        stop: asyncio.Event) -> None:  # fmt: skip
    """Run ``work()`` only while this replica holds ``lease`` (the controller's options:
    its namespace, duration and renewal), until ``stop``: two replicas of the service take
    each decision once (a server is not hibernated twice, nor frozen by one and asked by
    the other)."""
    from agent_sandbox.controller.leader import LeaderElector
    from agent_sandbox.kube import Kube

    kube = await Kube.connect(args.kubeconfig)
    elector = LeaderElector(kube, args.lease_namespace, name=lease,
                            duration=args.lease_duration, renew=args.lease_renew)  # fmt: skip
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():  # leadership lost: stand by for it again
            election = asyncio.ensure_future(elector.run(work))
            await asyncio.wait({election, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not election.done():
                election.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await election
    finally:
        stopping.cancel()
        await elector.release()
        await kube.close()


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.proxy_url and not args.hibernate:
        log.warning("--proxy-url is no longer used (servers are asked at their own address): "
                    "give --hibernate instead")  # fmt: skip
        args.hibernate = True
    status: dict = {"controller": bool(args.controller), "hibernation": bool(args.hibernate),
                    "binder": bool(args.binder)}  # fmt: skip
    launcher = None
    if args.binder:
        from .binder.web import launcher_from_args

        launcher = launcher_from_args(args)
        await launcher.start()
    if os.environ.get("JUPYTERHUB_SERVICE_URL"):
        serve(os.environ["JUPYTERHUB_SERVICE_URL"], status, launcher)
    tasks = []
    if args.hibernate:
        sleeper, interval = hibernator.from_args(args, hibernator.metrics())
        if args.binder and args.binder_anonymous:  # launches' temporary users
            sleeper.temporary_prefix = args.binder_anonymous_prefix
            sleeper.temporary_timeout = args.binder_anonymous_timeout
        log.info("hibernating servers idle for %ss%s (checks every %ss%s)", args.timeout,
                 f", freezing them after {args.freeze_after:g}s" if args.freeze_after else "",
                 interval, ", dry run" if args.dry_run else "")  # fmt: skip
        sweeps = hibernator.run(sleeper, interval, stop)
        if args.controller and not args.no_leader_election:  # replicas: one sweeps at a time
            sweeps = while_leading(args, HIBERNATOR_LEASE, lambda: hibernator.run(
                sleeper, interval, stop), stop)  # fmt: skip
        tasks.append(asyncio.create_task(sweeps))
    if args.controller:
        from agent_sandbox.__main__ import quiet_client_logs, run_from_args

        quiet_client_logs()
        tasks.append(asyncio.create_task(run_from_args(args, stop)))
    if not tasks and not args.binder:  # with Binder links, the pages are the work
        raise SystemExit("nothing to do: give --hibernate, --controller or "
                         "--binder-links")  # fmt: skip
    done, _ = await asyncio.wait([*tasks, asyncio.create_task(stop.wait())],
                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    for task in done:  # a part that ended on its own ends the service (the Hub restarts it)
        if not task.cancelled() and task.exception() is not None:
            log.error("a part of the service failed", exc_info=task.exception())
    stop.set()
    for task in tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)


def parser() -> argparse.ArgumentParser:
    """The service's command line: the hibernator's options and the controller's."""
    parser = argparse.ArgumentParser(prog="python -m sandbox_spawner.service",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    hibernator.add_arguments(parser.add_argument_group("hibernation"))
    controller = parser.add_argument_group("controller (Kubernetes)")
    controller.add_argument("--controller", action="store_true",
                            help="run the Agent Sandbox controller in this service")  # fmt: skip
    from agent_sandbox.__main__ import add_run_arguments

    add_run_arguments(controller)
    from .binder.web import add_arguments as add_binder_arguments

    add_binder_arguments(parser.add_argument_group("Binder links"))
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s sandbox-service %(name)s %(message)s")  # fmt: skip
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
