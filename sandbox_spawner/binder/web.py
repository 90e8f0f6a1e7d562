"""Binder links on the Hub service's URL: the launch page, its event stream, a page that
makes links and badges.

Under the service's prefix (``/services/sandbox-service``):

* ``/v2/<provider>/<spec>?urlpath=...``: the launch page (BinderHub's link form). A
  bad link gets an error page (400) at once; a good one a page that follows the
  event stream and then goes to the server;
* ``/build/<provider>/<spec>``: the event stream (server-sent events, as BinderHub's
  ``/build``), a ``:heartbeat`` every 30 s;
* ``/binder``: a form that makes a link and its badge (Markdown, reStructuredText);
  ``/badge.svg``: the badge.

Who is launching comes from the Hub's login (OAuth, as every Hub service; an API
token in the ``Authorization`` header works too). Without one, the page sends the
visitor to log in, unless the deployment launches anonymously (``--binder-anonymous``):
then a visitor logged in to the Hub still launches as themself (through the Hub's
login, at once), and one who is not as a temporary user (``?login=1`` asks to log in),
within the limits of :mod:`.admission` (the client's address: from the proxy's
``X-Forwarded-For`` when the request comes from a trusted proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import iostream, web

from .. import data_root
from ..hub_api import HubAPI
from .admission import LOOPBACK, client_of
from .launch import Launcher, LaunchSettings
from .links import DEFAULT_BASES, BadLink, LinkPolicy
from .prepare import DEFAULT_EGRESS, PrepareLimits, Preparer

PAGES = Path(__file__).parent / "pages"
_QUERY = ("urlpath", "labpath", "filepath")
HEARTBEAT = 30.0
#: The Hub's session cookie (path "/": this service sees it): the visitor is logged in.
HUB_SESSION_COOKIE = "jupyterhub-session-id"


class _BinderHandler(HubOAuthenticated, web.RequestHandler):
    def initialize(self, launcher: Launcher, prefix: str) -> None:
        self.launcher, self.prefix = launcher, prefix

    def user_name(self) -> str | None:
        model = self.get_current_user()
        if not model or model.get("kind", "user") != "user":
            return None
        return model["name"]

    def query(self) -> dict[str, str]:
        return {k: self.get_argument(k) for k in _QUERY if self.get_argument(k, "")}

    def get_template_path(self) -> str:
        return str(PAGES)


class LaunchPage(_BinderHandler):
    async def get(self, provider: str, spec: str) -> None:
        try:
            link, _ = self.launcher.check(provider, spec, self.query())
        except BadLink as exc:
            self.set_status(400)
            self.render("launch.html", error=str(exc), reason=exc.reason, prefix=self.prefix,
                        repo="", ref="", build_url="", repo_href=None, ref_href=None,
                        share_url="", badge_url="")  # fmt: skip
            return
        if self.user_name() is None and (
            not self.launcher.settings.anonymous or self.get_cookie(HUB_SESSION_COOKIE)
            or self.get_argument("login", "")
        ):  # fmt: skip
            # Through the Hub's login (at once, for a visitor logged in to the Hub): a user
            # launches as themself; anonymously only who is not logged in.
            self.redirect(self.get_login_url())
            return
        # The stream is fetched by the page (not a navigation): the Hub's login accepts its
        # cookie there only with the xsrf token.
        # The stream's address is the link's own path as it came (tornado hands ``spec``
        # over decoded: rebuilt from it, an escaped "/" or ".." became a real one, and the
        # browser went to another stream, or elsewhere with the session's token).
        raw = self.request.path
        launch_prefix = f"{self.prefix}/v2/"
        if not raw.startswith(launch_prefix):
            raise web.HTTPError(400, "not a launch link")
        query = urlencode({**self.query(), "_xsrf": self.xsrf_token.decode()})
        build = f"{self.prefix}/build/{raw[len(launch_prefix):]}?{query}"
        shared = urlencode(self.query())
        share = raw + (f"?{shared}" if shared else "")  # without the session
        self.render("launch.html", error="", reason="", prefix=self.prefix, repo=link.url,
                    ref=link.ref, build_url=build, repo_href=link.web_url,
                    ref_href=link.ref_url, share_url=share,
                    badge_url=f"{self.prefix}/badge.svg")  # fmt: skip


class BuildStream(_BinderHandler):
    async def get(self, provider: str, spec: str) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        user = self.user_name()
        client = client_of(self.request.remote_ip or "", self.request.headers.get(
            "X-Forwarded-For"), self.launcher.trusted_proxies)  # fmt: skip
        beat = asyncio.create_task(self._heartbeat())
        try:
            async for event in self.launcher.launch(provider, spec, self.query(), user, client):
                self.write(f"data: {json.dumps(event)}\n\n")
                await self.flush()
        except iostream.StreamClosedError:
            pass  # the page went away: the launch is cancelled with the generator
        finally:
            beat.cancel()

    async def _heartbeat(self) -> None:
        with contextlib.suppress(iostream.StreamClosedError):
            while True:
                await asyncio.sleep(HEARTBEAT)
                self.write(":heartbeat\n\n")
                await self.flush()


class HomePage(_BinderHandler):
    def get(self) -> None:
        self.render("home.html", prefix=self.prefix,
                    allowed_hosts=self.launcher.policy.allowed_hosts)  # fmt: skip


class Badge(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "image/svg+xml")
        self.set_header("Cache-Control", "max-age=86400")
        self.write((PAGES / "badge.svg").read_bytes())


def routes(launcher: Launcher, prefix: str) -> list[tuple[Any, ...]]:
    """The service's Binder routes under ``prefix``."""
    args = {"launcher": launcher, "prefix": prefix}
    return [
        (rf"{prefix}/v2/([^/]+)/(.+)", LaunchPage, args),
        (rf"{prefix}/build/([^/]+)/(.+)", BuildStream, args),
        (rf"{prefix}/binder/?", HomePage, args),
        (rf"{prefix}/badge.svg", Badge),
        (rf"{prefix}/oauth_callback", HubOAuthCallbackHandler),
    ]


#: The Binder settings a deployment's configuration takes from its environment (as the
#: shipped configurations do), and the service option each becomes.
SETTINGS = {
    "JUPYTER_SANDBOX_BINDER_HOSTS": "allowed-hosts",
    "JUPYTER_SANDBOX_BINDER_BASES": "base",
    "JUPYTER_SANDBOX_BINDER_INDEX": "index-url",
    "JUPYTER_SANDBOX_BINDER_EGRESS": "egress",
}


def settings_arguments(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The service's ``--binder-*`` options for the settings in ``environ`` (see
    :data:`SETTINGS`): hosts and index replace the defaults, egress hosts add to them,
    each of the comma-separated bases is an option."""
    args = []
    for variable, option in SETTINGS.items():
        value = environ.get(variable, "").strip()
        if not value:
            continue
        if option == "base":
            args += [f"--binder-base={b.strip()}" for b in value.split(",") if b.strip()]
        elif option == "egress":
            args.append(f"--binder-egress={','.join((*DEFAULT_EGRESS, value))}")
        else:
            args.append(f"--binder-{option}={value}")
    return args


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The service's Binder options."""

    def option(name: str, **kwargs: Any) -> None:
        group.add_argument(f"--binder-{name}", **kwargs)

    option("links", dest="binder", action="store_true",
           help="serve Binder links (/v2/...) on the service's URL")  # fmt: skip
    option("allowed-hosts", default="github.com,gitlab.com,gist.github.com",
           help="hosts repositories may come from (comma-separated fnmatch patterns)")
    option("base", action="append", default=[], metavar="PROVIDER=URL",
           help="where a provider's repositories are, e.g. gl=https://gitlab.example.org")
    option("egress", default=",".join(DEFAULT_EGRESS),
           help="hosts (host or host:port) preparations may reach besides the repository's "
           "host and the index (comma-separated)")  # fmt: skip
    option("index-url", default=None, help="pip's index for preparations (default: PyPI)")
    option("cache", default=str(data_root() / "binder"),
           help="where prepared environments are kept")
    option("cache-size", type=int, default=20480,
           help="MiB the prepared environments may hold (least recently launched out first)")
    option("runtime", default="auto", help="the preparations' sandbox: auto, gvisor, bubblewrap")
    option("prepare-timeout", type=float, default=600, help="seconds a preparation may take")
    option("prepare-memory", type=int, default=2048, help="MiB a preparation may use")
    option("prepare-disk", type=int, default=5120,
           help="MiB a prepared commit may hold (apparent sizes: a sparse file counts its "
           "length)")  # fmt: skip
    option("prepare-files", type=int, default=250_000,
           help="files, directories and links a prepared commit may hold")
    option("anonymous", action="store_true",
           help="visitors who are not logged in launch as temporary users")  # fmt: skip
    option("anonymous-prefix", default="binder-", help="temporary users' names start so")
    option("anonymous-timeout", type=float, default=600,
           help="seconds of idleness after which a temporary user's server stops and the "
           "user is deleted")  # fmt: skip
    option("per-repo-limit", type=int, default=0,
           help="servers of one repository running at once, all users (0: no limit)")
    option("per-user-limit", type=int, default=2, help="launches in flight per user")
    option("anonymous-limit", type=int, default=20,
           help="temporary users at once (running, starting or being made; 0: no limit)")
    option("client-launches", type=int, default=10,
           help="launches without login per client (address, IPv6 /64) and window (0: no "
           "limit)")  # fmt: skip
    option("client-window", type=float, default=600,
           help="seconds of that window")  # fmt: skip
    option("trusted-proxies", default=",".join(LOOPBACK),
           help="addresses or networks of the Hub's proxy (comma-separated): the only peers "
           "whose X-Forwarded-For names the client")  # fmt: skip
    option("profile", default="", help="the profile launched servers get (Kubernetes Hubs' "
           "profile_list; default: the default profile)")
    option("launch-timeout", type=float, default=300, help="seconds a server has to start")
    # Kubernetes: preparations as pods, the cache on a shared volume.
    option("pods", action="store_true",
           help="Kubernetes: prepare in pods (the cache is the volume --binder-claim, which "
           "the service sees at --binder-cache)")  # fmt: skip
    option("claim", default="jupyter-sandbox-binder-cache",
           help="Kubernetes: the prepared commits' PVC (ReadWriteMany)")
    option("namespace", default=os.environ.get("POD_NAMESPACE", "default"),
           help="Kubernetes: where preparation pods run")
    option("image", default=os.environ.get("JUPYTER_SANDBOX_SINGLEUSER_IMAGE", ""),
           help="Kubernetes: the preparation pods' image (the users' servers' image)")
    option("runtime-class", default="gvisor",
           help="Kubernetes: the preparation pods' runtime class ('' for the default)")
    option("proxy-listen", default="0.0.0.0:8899",
           help="Kubernetes: where the preparations' egress proxy listens")
    option("proxy-address", default=f"{os.environ.get('POD_IP', '127.0.0.1')}:8899",
           help="Kubernetes: where preparation pods reach that proxy (this pod's IP)")
    option("pod-python", default="python3", help="Kubernetes: Python in the image")


def launcher_from_args(args: argparse.Namespace) -> Launcher:
    bases = dict(DEFAULT_BASES)
    for item in args.binder_base:
        provider, _, url = item.partition("=")
        if provider not in bases or not url:
            raise SystemExit(f"--binder-base {item!r}: expected gh=URL, gl=URL or gist=URL")
        bases[provider] = url.rstrip("/")
    policy = LinkPolicy(allowed_hosts=_names(args.binder_allowed_hosts), bases=bases)
    limits = PrepareLimits(timeout=args.binder_prepare_timeout,
                           memory_bytes=args.binder_prepare_memory << 20,
                           disk_bytes=args.binder_prepare_disk << 20,
                           files=args.binder_prepare_files)  # fmt: skip
    preparer = Preparer(Path(args.binder_cache), runtime=args.binder_runtime,
                        egress=tuple(_names(args.binder_egress)),
                        index_url=args.binder_index_url, limits=limits)  # fmt: skip
    if args.binder_pods:
        from .egress import SharedEgressProxy
        from .kube_prepare import PodRunner

        if not args.binder_image:
            raise SystemExit("--binder-pods needs --binder-image (the servers' image)")
        host, _, port = args.binder_proxy_listen.rpartition(":")
        preparer.runner = PodRunner(
            namespace=args.binder_namespace, claim=args.binder_claim, image=args.binder_image,
            proxy=SharedEgressProxy(), proxy_address=args.binder_proxy_address,
            runtime_class=args.binder_runtime_class or None, python=args.binder_pod_python,
            listen=(host or "0.0.0.0", int(port)),
        )  # fmt: skip
    settings = LaunchSettings(anonymous=args.binder_anonymous,
                              anonymous_prefix=args.binder_anonymous_prefix,
                              per_repo_limit=args.binder_per_repo_limit,
                              per_user_limit=args.binder_per_user_limit,
                              anonymous_limit=args.binder_anonymous_limit,
                              client_launches=args.binder_client_launches,
                              client_window=args.binder_client_window,
                              trusted_proxies=tuple(_names(args.binder_trusted_proxies)),
                              launch_timeout=args.binder_launch_timeout,
                              cache_bytes=args.binder_cache_size << 20,
                              profile=args.binder_profile)  # fmt: skip
    try:
        return Launcher(policy, preparer, HubAPI(), settings)
    except ValueError as exc:  # a trusted proxy that is no address or network
        raise SystemExit(f"--binder-trusted-proxies: {exc}") from None


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]
