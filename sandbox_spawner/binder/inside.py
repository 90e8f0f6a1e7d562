"""The preparation's steps, run inside its sandbox: the repository's packages, then its
``postBuild``.

``python -m sandbox_spawner.binder.inside PLAN`` (PLAN: a JSON file the host wrote in
a read-only directory). The sandbox has no network; this process first listens on
loopback and carries each connection to the egress proxy's Unix socket (the host's
:class:`~.egress.EgressProxy`), and every step gets ``http_proxy``/``https_proxy``
pointing there. In a pod (Kubernetes), the proxy is the Hub service's, at the plan's
``proxy_url`` (its credentials name the preparation), and the output goes to the
plan's ``log``, on the volume the service reads. Packages go to the environment's
prefix with pip (``--prefix``: what the server's Python already has is not installed
again); ``postBuild`` runs in
the repository with that prefix first on its paths. Output goes to the preparation's
log, which the host streams to the launch page.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import sysconfig
import threading

from ..streams import forward_tcp_to_unix

#: Where the prepared environment's prefix is, in the preparation and in every server.
ENV_PATH = "/srv/binder"
#: Inside the sandbox: where the forwarder listens (its own loopback).
PROXY_PORT = 3128
#: In the prefix: where this Python put the packages (relative), for the servers' PYTHONPATH.
SITE_FILE = ".site"


def site_dir(prefix: str) -> str:
    """Where pip ``--prefix`` puts this Python's packages under ``prefix``.

    pip lays a prefix out as ``posix_prefix`` (``lib/python3.X/site-packages``) where
    Debian's own Python prefers ``posix_local`` (``local/lib/python3.X/dist-packages``):
    asked plainly, sysconfig names a directory pip never fills, and an image on Debian's
    Python would not find what the preparation installed (the real node showed it)."""
    scheme = sysconfig.get_preferred_scheme("prefix")
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_path("purelib", scheme, vars={"base": prefix, "platbase": prefix})


def _forward(socket_path: str, ready: threading.Event) -> None:
    async def serve() -> None:
        await forward_tcp_to_unix(PROXY_PORT, socket_path)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(serve())


def _step(title: str, argv: list[str], env: dict[str, str], cwd: str) -> None:
    print(f"--- {title}", flush=True)
    code = subprocess.call(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
    if code != 0:
        print(f"--- {title} failed (exit code {code})", flush=True)
        sys.exit(code or 1)


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    if plan.get("log"):  # a pod: the log goes where the service reads it (a shared volume)
        fd = os.open(plan["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for stream in (1, 2):
            os.dup2(fd, stream)
    if plan.get("proxy_url"):  # a pod: the Hub service's proxy, with this preparation's token
        proxy = plan["proxy_url"]
    else:
        ready = threading.Event()
        threading.Thread(target=_forward, args=(plan["proxy_socket"], ready), daemon=True).start()
        if not ready.wait(30):
            sys.exit("the egress forwarder did not start")
        proxy = f"http://127.0.0.1:{PROXY_PORT}"
    prefix, repo = plan["prefix"], plan["repo"]
    env = {**plan["env"], "http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy,
           "HTTPS_PROXY": proxy, "no_proxy": "", "NO_PROXY": "",
           "PYTHONPATH": site_dir(prefix), "PIP_PREFIX": prefix,
           "PATH": ":".join([f"{prefix}/bin", os.path.dirname(sys.executable),
                             plan["env"]["PATH"]])}  # fmt: skip
    with open(os.path.join(prefix, SITE_FILE), "w") as f:
        f.write(os.path.relpath(site_dir(prefix), prefix))
    if plan.get("requirements"):
        pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--prefix", prefix,
               "--no-warn-script-location", "--disable-pip-version-check", "--progress-bar",
               "off", "-r", plan["requirements"]]  # fmt: skip
        if plan.get("index_url"):
            pip += ["--index-url", plan["index_url"]]
        _step("installing the repository's packages (pip)", pip, env, repo)
    if plan.get("post_build"):
        _step("running postBuild", [plan["post_build"]], env, repo)
    print("--- prepared", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sandbox_spawner.binder.inside PLAN")
    main(sys.argv[1])
    os._exit(0)  # the forwarder's thread does not hold the sandbox open
