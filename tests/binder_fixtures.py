"""What Binder tests fetch from: git repositories and a Python package index, served over
plain HTTP from this machine's loopback by the test (never the internet).

* :func:`serve` serves a directory (git's dumb HTTP protocol needs nothing more);
* :func:`git_repo` commits a tree of files and makes it a served bare repository;
* :func:`wheel` writes a pure-Python wheel by hand (no build backend, no network);
  :func:`package_index` lays wheels out as a PEP 503 "simple" index;
* :func:`served` (a module's fixture): an index with ``demo_pkg`` and a directory of
  repositories, served; :func:`link` and :func:`preparer` prepare from them without a Hub;
* :func:`alias_bomb`: an ``environment.yml`` of nested YAML aliases ("billion laughs"), and
  :func:`peak_rss` to see what reading one cost a process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import subprocess
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hub_fixtures import Hub, end_supervisors
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from sandbox_spawner.binder.links import LinkPolicy, RepoLink
from sandbox_spawner.binder.prepare import PrepareLimits, Preparer
from sandbox_spawner.hub_api import event_stream
from testcluster.cluster import free_port

IDENT = ["-c", "user.name=t", "-c", "user.email=t@example.org"]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Served:
    """A directory served on 127.0.0.1 (a thread of the test process)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        handler = functools.partial(_Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(root: Path) -> Served:
    return Served(root)


def git_repo(root: Path, name: str, files: dict[str, str], executable: tuple[str, ...] = (),
             work: Path | None = None) -> str:  # fmt: skip
    """Commit ``files`` (path -> text) in a work tree (made, or ``work`` again for a second
    commit) and publish it as ``root/<name>.git`` for dumb HTTP; the new commit."""
    work = work or root / f"{name}-work"
    if not (work / ".git").exists():
        work.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=work)
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
        if path in executable:
            (work / path).chmod(0o755)
    git(*IDENT, "add", ".", cwd=work)
    git(*IDENT, "commit", "-q", "-m", "update", cwd=work)
    bare = root / f"{name}.git"
    if not bare.exists():
        git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    else:
        git("push", "-q", str(bare), "main", cwd=work)
    git("update-server-info", cwd=bare)
    return git("rev-parse", "HEAD", cwd=work)


def wheel(directory: Path, name: str, version: str, code: str) -> Path:
    """A pure-Python wheel of one module ``name`` holding ``code``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": code,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }  # fmt: skip
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    target = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return target


def package_index(root: Path, wheels: list[Path]) -> Path:
    """``root/simple/<project>/`` pages linking each wheel (PEP 503); the index's root."""
    for built in wheels:
        project = built.name.split("-")[0].lower().replace("_", "-")
        page = root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        (page / built.name).write_bytes(built.read_bytes())
        (page / "index.html").write_text(f'<a href="{built.name}">{built.name}</a>\n')
    return root / "simple"


def alias_bomb(levels: int = 7, fanout: int = 11) -> str:
    """An ``environment.yml`` of about 400 bytes whose one dependency is ``fanout ** levels``
    strings through nested aliases: a YAML parser shares the aliased nodes, and anything that
    walks the result (``repr``, ``str``, JSON) writes them all out (here ~140 MiB)."""
    items = ",".join(['"lol"'] * fanout)
    lines = [f"a0: &a0 [{items}]"]
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"dependencies: [*a{levels - 1}]"]) + "\n"


def peak_rss(pid: int | str = "self", reset: bool = False) -> int:
    """The peak resident memory (bytes) of process ``pid`` since its last reset (``reset``:
    reset it now, as root may for any process)."""
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


# -- preparations without a Hub ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Any:
    """An index with ``demo_pkg`` and a directory of repositories (``git_repo``), served."""
    root = tmp_path_factory.mktemp("binder")
    wheels = root / "wheels"
    wheels.mkdir()
    index_root = root / "index"
    package_index(index_root, [wheel(wheels, "demo_pkg", "1.0", "VALUE = 'from the index'\n")])
    index = serve(index_root)
    repos = root / "repos"
    repos.mkdir()
    git = serve(repos)
    yield {"root": root, "repos": repos, "git": git, "index": index}
    index.close()
    git.close()


def link(served: dict[str, Any], name: str, ref: str = "main") -> RepoLink:
    url = f"{served['git'].url}/{name}.git"
    return LinkPolicy(allowed_hosts=["127.0.0.1"]).parse("git", f"{quote(url, safe='')}/{ref}")


def preparer(served: dict[str, Any], tmp_path: Path, runtime: str, **limits: Any) -> Preparer:
    return Preparer(tmp_path / "cache", runtime=runtime, egress=(),
                    index_url=f"{served['index'].url}/simple/",
                    limits=PrepareLimits(**{"timeout": 120, **limits}))  # fmt: skip


@contextlib.asynccontextmanager
async def pod_preparer(
    served: dict[str, Any], cluster: Any, node: Any = None
) -> AsyncIterator[tuple[Preparer, Any, str, Path]]:
    """A preparer whose preparations are pods on the test cluster, in a namespace of their
    own, with the service's egress proxy on a port of the host: (preparer, API client,
    namespace, the cache on the node's volume). All of it goes afterwards.

    On the stand-in node (``node`` None) pods run the host's Python on the host's network
    and the cache is the stand-in's directory of the claim. On a real node (``node``: a
    :class:`testcluster.realnode.RealNode`) they are gVisor pods of the node's image that
    reach the proxy on the host's end of the node's link, and the cache is a local
    PersistentVolume bound to the claim, as a Hub's cache volume would be."""
    import sys
    import uuid

    from agent_sandbox.kube import PVCS, Kube
    from sandbox_spawner.binder.egress import SharedEgressProxy
    from sandbox_spawner.binder.kube_prepare import PodRunner

    namespace = f"binder-{uuid.uuid4().hex[:8]}"
    status, body = cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    assert status == 201, body
    proxy = SharedEgressProxy()
    host = node.slot.host_ip if node else "127.0.0.1"
    port = free_port()
    await proxy.start_tcp(host, port)
    kube = await Kube.connect(str(cluster.kubeconfig))
    try:
        pods: dict[str, Any] = {"image": "unused:1", "runtime_class": None,
                                "python": sys.executable}  # fmt: skip
        if node is None:
            cache_root = cluster.workdir / "node" / "pvc" / namespace / "binder-cache"
        else:
            (cache_root,) = node.local_volumes(cluster, namespace, 1)
            claim = {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": f"{namespace}-0", "resources": {"requests": {"storage": "1Gi"}}}
            await kube.create(PVCS, namespace, {"metadata": {"name": "binder-cache"},
                                                "spec": claim})  # fmt: skip
            pods = {"image": "jupyter-sandbox-singleuser:test", "runtime_class": "gvisor",
                    "python": "python3"}  # fmt: skip
        runner = PodRunner(namespace=namespace, claim="binder-cache", proxy=proxy,
                           proxy_address=f"{host}:{port}", kube=kube, **pods)  # fmt: skip
        prep = Preparer(cache_root, egress=(), index_url=f"{served['index'].url}/simple/",
                        runner=runner, limits=PrepareLimits(timeout=120))  # fmt: skip
        yield prep, kube, namespace, cache_root
    finally:
        await proxy.close()
        await kube.close()
        cluster.request("DELETE", f"/api/v1/namespaces/{namespace}")


def events() -> tuple[list[tuple[str, str]], Any]:
    """What a preparation emits, and the ``emit`` that records it."""
    seen: list[tuple[str, str]] = []
    return seen, lambda phase, message: seen.append((phase, message))


# -- Binder launches on a real Hub ------------------------------------------------------------
SERVICE = "/services/sandbox-service"
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
               "source": "import demo_pkg\nprint('package says', demo_pkg.VALUE)"}],
    "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
}  # fmt: skip
POST_BUILD = "#!/bin/sh\necho ran >> postbuild-runs.txt\n"


class BinderHub:
    """A Hub (the shipped configuration, Binder links on, anonymous launches allowed) with a
    repository and a package index to launch from, all on loopback."""

    def __init__(self, root: Path, runtime: str = "bubblewrap", args: tuple[str, ...] = ()):
        self.root = root
        self.hub, self.git, self.index = _start(root, runtime, args)
        self.repos = root / "repos"
        self.repo_url = f"{self.git.url}/demo.git"

    def close(self) -> None:
        self.hub.close()
        end_supervisors(self.root)
        self.git.close()
        self.index.close()


def serve_demo(root: Path) -> tuple[Served, Served]:
    """The "demo" repository (``binder/requirements.txt``: ``demo_pkg``, a postBuild, a
    notebook) served at ``<git>/demo.git``, and an index with ``demo_pkg``: (git, index)."""
    wheels = root / "wheels"
    wheels.mkdir()
    package_index(root / "index", [wheel(wheels, "demo_pkg", "1.0", "VALUE = 'from the index'\n")])
    index = serve(root / "index")
    repos = root / "repos"
    repos.mkdir()
    git = serve(repos)
    git_repo(repos, "demo", {
        "binder/requirements.txt": "demo_pkg\n", "binder/postBuild": POST_BUILD,
        "index.ipynb": json.dumps(NOTEBOOK),
    }, executable=("binder/postBuild",))  # fmt: skip
    return git, index


def _start(root: Path, runtime: str, args: tuple[str, ...]) -> tuple[Hub, Served, Served]:
    git, index = serve_demo(root)
    extra = f"""
from sandbox_spawner.service import hub_role
c.JupyterHub.services[0]["command"] += [
    "--binder-allowed-hosts=127.0.0.1", "--binder-index-url={index.url}/simple/",
    "--binder-egress=", "--binder-runtime={runtime}", "--binder-anonymous",
    "--binder-anonymous-timeout=4", "--interval=1", "--binder-per-repo-limit=3",
    *{list(args)!r}]
c.JupyterHub.load_roles[0] = hub_role(binder=True, anonymous=True)
"""
    return Hub(root, runtime=runtime, extra_config=extra).start(), git, index


def spec(url: str, ref: str = "main") -> str:
    return f"{quote(url, safe='')}/{ref}"


async def launch(hub: Hub, provider: str, what: str, token: str | None = None,
                 urlpath: str = "index.ipynb", source: str | None = None,
                 headers: dict[str, str] | None = None) -> list[dict]:  # fmt: skip
    """The launch's event stream, to its end; ``source``: the address the request comes from
    (a loopback address, 127.0.0.2 say: another client of the proxy)."""
    events: list[dict] = []
    query = f"?urlpath={quote(urlpath, safe='')}" if urlpath else ""
    response = await AsyncHTTPClient().fetch(HTTPRequest(
        f"{hub.url}{SERVICE}/build/{provider}/{what}{query}",
        headers={**({"Authorization": f"token {token}"} if token else {}), **(headers or {})},
        streaming_callback=event_stream(events.append), request_timeout=300,
        network_interface=source,
    ), raise_error=False)  # fmt: skip
    assert response.code == 200, (response.code, response.body)
    assert events and events[-1]["phase"] in ("ready", "failed"), events
    return events


def phases(events: list[dict]) -> list[str]:
    return list(dict.fromkeys(e["phase"] for e in events))


def server_of(event: dict) -> tuple[str, str]:
    """(user, server name) of a ready event's URL (/user/<user>/<server>/...)."""
    parts = event["url"].split("?")[0].split("/")
    return parts[2], parts[3]


async def user_token(hub: Hub, name: str) -> str:
    await hub.api("POST", f"/users/{name}", raise_error=False)
    return await hub.user_token(name)


async def server_stopped(hub: Hub, user: str, server: str) -> bool:
    model = await hub.api("GET", f"/users/{user}")
    return server not in (model.get("servers") or {})


async def user_gone(hub: Hub, name: str) -> bool:
    response = await hub.api("GET", f"/users/{name}", raise_error=False)
    return response.code == 404


async def wait_for(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.5)
    return False
