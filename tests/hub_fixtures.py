"""A real JupyterHub with its real proxy (configurable-http-proxy) and LocalSandboxSpawner.

The Hub runs as its own process on loopback ports, with a service token the
tests use as an administrator; users are made and their servers started through
the Hub's REST API, and reached through the proxy as a browser would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cluster_fixtures import hub_service_account
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from sandbox_spawner.hub_api import event_stream
from testcluster.cluster import free_ports

SHIPPED = Path(__file__).resolve().parent.parent / "jupyter_config" / "jupyterhub_config.py"
#: The shipped configuration, on ports and in directories of the test's own, with a service
#: token for the tests.
HUB_CONFIG = """
load_subconfig("{shipped}")
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}  # a spawn request answers at once
c.JupyterHub.cleanup_proxy = False
c.LocalSandboxSpawner.runtime = "{runtime}"
c.LocalSandboxSpawner.homes_root = "{root}/homes"
c.LocalSandboxSpawner.state_root = "{root}/servers"
c.LocalSandboxSpawner.hibernation_images = "{root}/hibernated"
c.LocalSandboxSpawner.mem_limit = "1G"
c.LocalSandboxSpawner.pids_limit = 256
c.LocalSandboxSpawner.start_timeout = 120
c.JupyterHub.services.append({{"name": "tests", "api_token": "{token}"}})
c.JupyterHub.load_roles.append({{"name": "tests", "services": ["tests"],
    "scopes": ["admin:users", "admin:servers", "tokens", "access:servers", "list:users",
               "read:users", "users:activity"]}})
"""


#: The shipped Kubernetes configuration against the test cluster: servers bind their pod IP
#: (pods share the host's network there), the Hub on loopback; a profile without a runtime
#: class (bubblewrap on the stand-in node) beside the shipped ones.
KUBE_HUB_CONFIG = """
load_subconfig("{shipped_kube}")
c.JupyterHub.bind_url = "http://127.0.0.1:{{proxy_port}}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {{hub_port}}
c.JupyterHub.hub_connect_url = "http://127.0.0.1:{{hub_port}}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{{api_port}}"
c.JupyterHub.db_url = "sqlite:///{{root}}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{{root}}/cookie_secret"
c.ConfigurableHTTPProxy.pid_file = "{{root}}/proxy.pid"
c.JupyterHub.tornado_settings = {{{{"slow_spawn_timeout": 0}}}}
c.JupyterHub.cleanup_proxy = False
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "{{password}}"
c.Authenticator.allow_all = True
c.SandboxSpawner.start_timeout = 120
c.SandboxSpawner.ip = "$(POD_IP)"
c.SandboxSpawner.environment = {{{{
    "POD_IP": {{{{"valueFrom": {{{{"fieldRef": {{{{"fieldPath": "status.podIP"}}}}}}}}}}}}}}}}
c.SandboxSpawner.profile_list += [
    {{{{"display_name": "Plain", "slug": "plain", "kubespawner_override": {{{{}}}}}}}},
    {{{{"display_name": "Missing", "slug": "missing-runtime", "kubespawner_override":
        {{{{"extra_pod_config": {{{{"runtimeClassName": "no-such-runtime"}}}}}}}}}}}},
    {{{{"display_name": "Bad image", "slug": "bad-image", "kubespawner_override":
        {{{{"image": "registry.invalid/no-such-image:1"}}}}}}}},
    {{{{"display_name": "No template", "slug": "missing-template", "kubespawner_override":
        {{{{"sandbox_template": "no-such-template"}}}}}}}},
    {{{{"display_name": "Templated", "slug": "templated", "kubespawner_override":
        {{{{"sandbox_template": "course-base"}}}}}}}},
]
c.JupyterHub.services.append({{{{"name": "tests", "api_token": "{{token}}"}}}})
c.JupyterHub.load_roles.append({{{{"name": "tests", "services": ["tests"],
    "scopes": ["admin:users", "admin:servers", "tokens", "access:servers", "list:users",
               "read:users", "users:activity"]}}}})
""".format(shipped_kube=SHIPPED.parent / "kubernetes" / "jupyterhub_config.py")


#: Added to KUBE_HUB_CONFIG for a Hub whose servers are pods on the real node: they reach
#: the Hub on the host's end of the node's link, and run the image the node has (no
#: registry). The shipped default profile (gVisor) stays the default.
REAL_NODE_HUB_CONFIG = """
c.JupyterHub.hub_ip = "{host}"
c.JupyterHub.hub_connect_url = f"http://{host}:{{c.JupyterHub.hub_port}}"
c.SandboxSpawner.image = "jupyter-sandbox-singleuser:latest"
c.SandboxSpawner.image_pull_policy = "IfNotPresent"
"""


def real_node_hub_config(node) -> str:
    return REAL_NODE_HUB_CONFIG.format(host=node.slot.host_ip)


class Hub:
    """One JupyterHub process (restartable) and helpers to drive it."""

    def __init__(self, root: Path, runtime: str = "bubblewrap", hibernate_after: float = 3600,
                 extra_config: str = "", config: str = HUB_CONFIG,
                 env: dict[str, str] | None = None, **values: Any):  # fmt: skip
        self.root = root
        self.proxy_port, self.hub_port, self.api_port, self.service_port = free_ports(4)
        self.token, self.password = uuid.uuid4().hex, uuid.uuid4().hex
        self.config = root / "jupyterhub_config.py"
        self.config.write_text(config.format(shipped=SHIPPED, root=root, token=self.token,
                                             runtime=runtime, hub_port=self.hub_port,
                                             api_port=self.api_port, proxy_port=self.proxy_port,
                                             password=self.password, **values)
                               + extra_config)  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.log = root / "hub.log"
        self.hibernate_after = hibernate_after
        self.env = env or {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self) -> Hub:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "JUPYTER_SANDBOX_HUB_DATA": str(self.root), "JUPYTER_SANDBOX_HUB_URL": self.url,
               "JUPYTER_SANDBOX_HUB_PASSWORD": self.password,
               "JUPYTER_SANDBOX_HIBERNATE_AFTER": str(self.hibernate_after),
               "JUPYTER_SANDBOX_SERVICE_PORT": str(self.service_port),
               **self.env}  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.config)],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Hub exited:\n{self.log.read_text()[-5000:]}")
            try:
                import urllib.request

                urllib.request.urlopen(f"{self.url}/hub/api", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the Hub did not answer:\n{self.log.read_text()[-5000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.proc = None

    def close(self) -> None:
        """Stop the Hub and its proxy (which outlives a Hub's stop, as a restart needs)."""
        self.stop()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((self.root / "proxy.pid").read_text()), signal.SIGTERM)

    async def api(self, method: str, path: str, body: Any = None, token: str | None = None,
                  raise_error: bool = True) -> Any:  # fmt: skip
        """A request to the Hub API (as the tests' service, or with ``token``)."""
        return await _request(f"{self.url}/hub/api{path}", method, token or self.token, body,
                              raise_error)  # fmt: skip

    async def spawn(self, name: str, timeout: float = 180,
                    options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Make the user (if new), start the default server, wait until it is ready."""
        await self.api("POST", f"/users/{_q(name)}", raise_error=False)
        await self.api("POST", f"/users/{_q(name)}/server", options, raise_error=False)
        return await self.wait_ready(name, timeout)

    async def wait_ready(self, name: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            user = await self.api("GET", f"/users/{_q(name)}")
            server = (user.get("servers") or {}).get("")
            if server and server.get("ready"):
                return user
            if not server:
                raise RuntimeError(f"{name}'s server stopped:\n{self.log.read_text()[-5000:]}")
            await asyncio.sleep(0.3)
        raise TimeoutError(f"{name}'s server was not ready:\n{self.log.read_text()[-5000:]}")

    async def stops_within(self, name: str, timeout: float) -> bool:
        """Whether ``name``'s server stops (is hibernated) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (await self.api("GET", f"/users/{_q(name)}")).get("servers"):
                return True
            await asyncio.sleep(0.5)
        return False

    async def wait_stopped(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (await self.api("GET", f"/users/{_q(name)}")).get("servers"):
                return
            await asyncio.sleep(0.3)
        raise TimeoutError(f"{name}'s server did not stop")

    async def state(self, name: str) -> dict[str, Any]:
        """The spawner's state of ``name``'s default server (admin:servers)."""
        user = await self.api("GET", f"/users/{_q(name)}")
        return user["servers"][""]["state"]

    async def user_token(self, name: str) -> str:
        reply = await self.api("POST", f"/users/{_q(name)}/tokens", {"note": "tests"})
        return reply["token"]

    async def server_api(self, name: str, token: str, method: str, path: str,
                         body: Any = None) -> Any:  # fmt: skip
        """A request to ``name``'s server, through the proxy, with ``token``."""
        return await _request(f"{self.url}/user/{_q(name)}{path}", method, token, body)

    async def kernel(self, name: str, token: str, kernel_name: str = "python3") -> str:
        """A new kernel in ``name``'s server (through the proxy): its id."""
        kernel = await self.server_api(name, token, "POST", "/api/kernels", {"name": kernel_name})
        return kernel["id"]

    async def channels(self, name: str, token: str, kernel_id: str) -> Any:
        """A websocket to the kernel ``kernel_id`` in ``name``'s server (as a browser's)."""
        url = (f"ws://127.0.0.1:{self.proxy_port}/user/{_q(name)}/api/kernels/{kernel_id}"
               "/channels")  # fmt: skip
        return await websocket_connect(HTTPRequest(
            f"{url}?session_id={uuid.uuid4().hex}", headers={"Authorization": f"token {token}"}
        ))  # fmt: skip

    async def _send_code(self, name: str, token: str, code: str, kernel_name: str = "python3",
                         kernel_id: str | None = None, ws: Any = None,
                         ) -> tuple[Any, str, str]:  # fmt: skip
        """``code`` sent over a websocket to the kernel ``kernel_id`` (a new one if None):
        the websocket (``ws`` if given), the request's id and the kernel's id."""
        kernel_id = kernel_id or await self.kernel(name, token, kernel_name)
        ws = ws or await self.channels(name, token, kernel_id)
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": name,
                       "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))  # fmt: skip
        return ws, msg_id, kernel_id

    async def run_detached(self, name: str, token: str, code: str,
                           kernel_name: str = "python3") -> str:  # fmt: skip
        """Start ``code`` in a new kernel, then close the websocket: a computation that
        goes on with no browser attached. The kernel's id."""
        ws, _, kernel_id = await self._send_code(name, token, code, kernel_name)
        await asyncio.sleep(1)
        ws.close()
        return kernel_id

    async def progress(self, name: str) -> list[dict]:
        """The events of the progress stream of ``name``'s pending start, to its end; a
        start that had already failed (faster than this request) reads as one failed
        event with the Hub's logged reason."""
        events: list[dict] = []
        response = await AsyncHTTPClient().fetch(HTTPRequest(
            f"{self.url}/hub/api/users/{name}/server/progress",
            headers={"Authorization": f"token {self.token}"},
            streaming_callback=event_stream(events.append),
            request_timeout=180,
        ), raise_error=False)  # fmt: skip
        if response.code == 400 and not events:  # "not starting": it ended already
            deadline = time.monotonic() + 15  # the Hub clears a failed start up after it
            while (user := await self.api("GET", f"/users/{name}")).get("servers"):
                assert time.monotonic() < deadline, user
                await asyncio.sleep(0.1)
            failures = [line for line in self.log.read_text().splitlines()
                        if f"Unhandled error starting {name}'s server" in line]  # fmt: skip
            assert failures, f"{name}'s start ended without an error"
            return [{"failed": True, "message": failures[-1]}]
        assert response.code == 200, response.code
        return events

    async def execute(self, name: str, token: str, code: str, timeout: float = 60,
                      kernel_name: str = "python3", kernel_id: str | None = None,
                      ws: Any = None) -> str:  # fmt: skip
        """Run ``code`` in ``name``'s server (through the proxy); its output. In a new
        kernel, ended after, unless ``kernel_id`` is given (kept, as is the websocket
        ``ws`` if given)."""
        new, given = kernel_id is None, ws
        ws, msg_id, kernel_id = await self._send_code(name, token, code, kernel_name,
                                                      kernel_id, ws)  # fmt: skip
        out, deadline = "", time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
                if raw is None:
                    break
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out += content["text"]
                elif kind == "error":
                    out += f"{content['ename']}: {content['evalue']}"
                elif kind == "status" and content["execution_state"] == "idle":
                    break
        finally:
            if given is None:
                ws.close()
            if new:
                await self.server_api(name, token, "DELETE", f"/api/kernels/{kernel_id}")
        return out


def _q(name: str) -> str:
    """A user name (or ``user/server``) in a URL's path."""
    return quote(name, safe="/")


async def _request(url: str, method: str, token: str, body: Any = None,
                   raise_error: bool = True) -> Any:  # fmt: skip
    """The decoded JSON answer (the response itself when not raising for errors)."""
    response = await AsyncHTTPClient().fetch(HTTPRequest(
        url, method=method, headers={"Authorization": f"token {token}"},
        body=None if body is None else json.dumps(body), allow_nonstandard_methods=True,
        request_timeout=120,
    ), raise_error=raise_error)  # fmt: skip
    if not raise_error:
        return response
    return json.loads(response.body) if response.body else None


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
async def browser():
    """Debian's Chromium, headless, driven by Playwright."""
    if not os.path.exists(CHROMIUM):
        message = "Chromium is not installed (scripts/setup installs it for the tests)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield browser
        await browser.close()


def processes_of(uid: int) -> list[int]:
    """Processes of ``uid`` that run (a zombie waiting for init to reap it does not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = dict(x.split(":", 1) for x in (entry / "status").read_text().splitlines())
            except (OSError, ValueError):
                continue
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                found.append(int(entry.name))
    return found


def with_service_args(*args: str) -> str:
    """Hub configuration that adds ``args`` to the sandbox-service's command."""
    return "\n".join(f"c.JupyterHub.services[0]['command'].append({a!r})" for a in args) + "\n"


@pytest.fixture
def make_hub(tmp_path_factory):
    """Hubs of the test's own, ended after it: ``make(hibernate_after, *service_args,
    runtime=..., env=...)``."""
    from conftest import require_runtime

    hubs: list[Hub] = []

    def make(hibernate_after: float, *args: str, runtime: str = "bubblewrap",
             env: dict[str, str] | None = None) -> Hub:  # fmt: skip
        require_runtime(runtime)
        root = tmp_path_factory.mktemp(f"hub-{runtime}")
        hub = Hub(root, runtime=runtime, hibernate_after=hibernate_after, env=env,
                  extra_config=with_service_args(*args))  # fmt: skip
        hubs.append(hub.start())
        return hub

    yield make
    for hub in hubs:
        hub.close()
        end_supervisors(hub.root)


async def login(page: Any, hub: Hub, name: str) -> None:
    """Log ``name`` in on the Hub's login page (the shipped configuration's password)."""
    await page.goto(f"{hub.url}/hub/login")
    await page.fill("input[name=username]", name)
    await page.fill("input[name=password]", hub.password)
    await page.click("#login_submit")


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[Hub]:
    from conftest import require_runtime

    require_runtime("bubblewrap")
    root = tmp_path_factory.mktemp("hub")
    hub = Hub(root).start()
    yield hub
    hub.close()
    end_supervisors(root)


@pytest.fixture(scope="module")
def gvisor_hub(tmp_path_factory) -> Iterator[Hub]:
    """A Hub whose users' servers are gVisor sandboxes (restored from a template once one
    is built)."""
    from conftest import require_runtime

    require_runtime("gvisor")
    root = tmp_path_factory.mktemp("gvisor-hub")
    hub = Hub(root, runtime="gvisor").start()
    yield hub
    hub.close()
    end_supervisors(root)


@pytest.fixture(scope="module")
def hibernating_hub(tmp_path_factory) -> Iterator[Hub]:
    """A Hub whose hibernator stops servers after 4 quiet seconds."""
    from conftest import require_runtime

    require_runtime("bubblewrap")
    root = tmp_path_factory.mktemp("hibernating-hub")
    hub = Hub(root, hibernate_after=4).start()
    yield hub
    hub.close()
    end_supervisors(root)


def start_kube_hub(tmp_path_factory, cluster, hibernate_after: float = 3600,
                   extra_config: str = "", env: dict[str, str] | None = None) -> Hub:  # fmt: skip
    """A Hub with SandboxSpawner on the test cluster, in a namespace of its own. Its
    service runs the controller on the test session's lease: it leads when no other
    controller of the session does, else it stays passive."""
    namespace = f"hub-{uuid.uuid4().hex[:8]}"
    status, body = cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    assert status == 201, body
    root = tmp_path_factory.mktemp("kube-hub")
    # The Hub and its service hold the Hub's service account's permissions and no more;
    # the service's controller shares the test session's lease (in "default"), as a second
    # controller of one cluster does, so one controller reconciles at a time.
    kubeconfig = hub_service_account(cluster, namespace, root, lease_namespace="default")
    hub = Hub(root, config=KUBE_HUB_CONFIG, namespace=namespace, hibernate_after=hibernate_after,
              extra_config=extra_config,
              env={"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": namespace,
                   "JUPYTER_SANDBOX_LEASE_NAMESPACE": "default"})  # fmt: skip
    # ``env``'s values may name the Hub's namespace: "{namespace}".
    hub.env |= {k: v.format(namespace=namespace) for k, v in (env or {}).items()}
    hub.namespace = namespace  # type: ignore[attr-defined]
    return hub.start()


@pytest.fixture(scope="module")
def kube_hub(tmp_path_factory, cluster, node_agent) -> Iterator[Hub]:
    hub = start_kube_hub(tmp_path_factory, cluster)
    yield hub
    hub.close()
    cluster.request("DELETE", f"/api/v1/namespaces/{hub.namespace}")  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def hibernating_kube_hub(tmp_path_factory, cluster, node_agent) -> Iterator[Hub]:
    """The same, its service hibernating servers after 4 quiet seconds."""
    hub = start_kube_hub(tmp_path_factory, cluster, hibernate_after=4)
    yield hub
    hub.close()
    cluster.request("DELETE", f"/api/v1/namespaces/{hub.namespace}")  # type: ignore[attr-defined]


def processes_of_module(module: str, with_arg: str) -> list[int]:
    """Pids of processes running ``python -m module`` with an argument that contains
    ``with_arg`` (a Hub's root, to tell one test's Hub from another's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in cmdline and any(with_arg.encode() in a for a in cmdline):
                found.append(int(entry.name))
    return found


def supervisors(root: Path) -> list[int]:
    """Pids of the server supervisors of the Hub in ``root``."""
    return processes_of_module("sandbox_spawner.supervisor", str(root))


def end_supervisors(root: Path, timeout: float = 30) -> None:
    """Servers outlive the Hub by design: end them with the test's Hub."""
    pids = supervisors(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


__all__ = [
    "HTTPClientError",
    "Hub",
    "end_supervisors",
    "hibernating_kube_hub",
    "hub",
    "kube_hub",
    "supervisors",
]
