"""Kernel start-up through a real jupyter_server, as a JupyterLab user waits for it.

Two servers run side by side on loopback: one with the shipped configuration
(``jupyter_config/jupyter_server_config.py``: sandboxed kernelspecs only, pools and
templates as shipped) and a plain one whose ``python3`` kernel is started by
jupyter_client's local-provisioner (the baseline). Each measured start is what the
browser does for a new notebook: ``POST /api/sessions`` (its own notebook path, so its
own JPY_SESSION_NAME), open the kernel's websocket, ``kernel_info`` until it answers,
execute ``1 + 1``; the clock runs from the POST to the ``execute_reply``.
Kernels are shut down between runs (not timed), at least ``--pause`` seconds apart (5:
a pool has refilled, as between a user's notebooks), and each start waits for a quiet
machine (a refill's CPU, or a slow one's, would otherwise slow the next start,
whichever mode it is). Modes run round-robin after one
warm-up each, so machine noise hits all alike; medians and ratios to the baseline:

    .venv/bin/python benchmarks/server_kernel_startup.py [--runs 7]
        [--kernels sandboxed-python,sandboxed-python-bubblewrap,sandboxed-python-gvisor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from testcluster.cluster import free_port  # noqa: E402

CONFIG = REPO / "jupyter_config" / "jupyter_server_config.py"
BASELINE = "python3 (local-provisioner)"


class Server:
    """A jupyter_server process on loopback with a token."""

    def __init__(self, root: Path, config: Path | None):
        self.root, self.config = root, config
        self.port, self.token = free_port(), uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        args = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
                f"--ServerApp.port={self.port}", "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}"]
        if self.config is not None:
            args.append(f"--config={self.config}")
        log = open(self.root / "server.log", "w")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"jupyter_server did not start; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    async def api(self, method: str, path: str, body: object = None) -> object:
        response = await AsyncHTTPClient().fetch(HTTPRequest(
            f"{self.base}{path}", method=method, headers={"Authorization": f"token {self.token}"},
            body=None if body is None else json.dumps(body), allow_nonstandard_methods=True,
            request_timeout=300))  # fmt: skip
        return json.loads(response.body) if response.body else None


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, all


async def quiet(idle: float = 0.9, window: float = 0.5, at_most: float = 30.0) -> None:
    """Wait until the CPUs were at least ``idle`` idle over ``window`` seconds (a pool's
    refill, a kernel shutting down: done), for ``at_most`` seconds."""
    deadline = time.monotonic() + at_most
    while time.monotonic() < deadline:
        idle0, total0 = _cpu_times()
        await asyncio.sleep(window)
        idle1, total1 = _cpu_times()
        if (idle1 - idle0) >= idle * max(1, total1 - total0):
            return


def message(kind: str, content: dict, session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    return msg_id, json.dumps({
        "header": {"msg_id": msg_id, "msg_type": kind, "username": "bench", "session": session,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "content": content})  # fmt: skip


async def start_and_execute(server: Server, kernel_name: str) -> float:
    """Seconds from POST /api/sessions (a new notebook, as JupyterLab opens one) to the
    first execute_reply."""
    started = time.perf_counter()
    path = f"notebook-{uuid.uuid4().hex[:8]}.ipynb"
    body = {"path": path, "name": path, "type": "notebook", "kernel": {"name": kernel_name}}
    opened = await server.api("POST", "/api/sessions", body)
    kernel = opened["kernel"]  # type: ignore[index]
    session = uuid.uuid4().hex
    url = server.base.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels"
    ws = await websocket_connect(HTTPRequest(
        f"{url}?session_id={session}", headers={"Authorization": f"token {server.token}"}))
    try:
        info_id, info = message("kernel_info_request", {}, session)
        ws.write_message(info)
        exec_id = None
        while True:
            raw = await asyncio.wait_for(ws.read_message(), 120)
            if raw is None:
                raise RuntimeError("the kernel's websocket closed")
            msg = json.loads(raw)
            parent = msg.get("parent_header", {}).get("msg_id")
            if parent == info_id and msg["msg_type"] == "kernel_info_reply" and exec_id is None:
                exec_id, execute = message("execute_request", {
                    "code": "1 + 1", "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False}, session)  # fmt: skip
                ws.write_message(execute)
            elif parent == exec_id and msg["msg_type"] == "execute_reply":
                return time.perf_counter() - started
    finally:
        ws.close()
        await server.api("DELETE", f"/api/sessions/{opened['id']}")  # type: ignore[index]


async def run(runs: int, kernels: list[str], pause: float) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        roots = {name: Path(tmp) / name for name in ("sandboxed", "plain")}
        for root in roots.values():
            root.mkdir()
        sandboxed = Server(roots["sandboxed"], CONFIG).start()
        plain = Server(roots["plain"], None).start()
        modes = [(BASELINE, plain, "python3"), *((k, sandboxed, k) for k in kernels)]
        times: dict[str, list[float]] = {label: [] for label, _, _ in modes}
        try:
            for _label, server, name in modes:  # warm-up: pools fill, templates build
                await start_and_execute(server, name)
            await asyncio.sleep(10)  # let pools refill and templates finish
            for _ in range(runs):
                for label, server, name in modes:
                    await quiet()
                    times[label].append(await start_and_execute(server, name))
                    await asyncio.sleep(pause)  # pools refill between a user's notebooks
        finally:
            sandboxed.stop()
            plain.stop()
    base = statistics.median(times[BASELINE])
    print(f"kernel start through jupyter_server (POST /api/sessions -> first execute_reply), "
          f"{runs} runs, "
          f"{'root' if os.geteuid() == 0 else 'not root'}")  # fmt: skip
    print(f"{'kernelspec':<34} {'median':>8} {'min':>8} {'ratio':>7}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:<34} {median:8.3f} {min(values):8.3f} {median / base:6.2f}x")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pause", type=float, default=5.0,
                        help="seconds between two starts (a pool refills meanwhile)")  # fmt: skip
    parser.add_argument("--kernels", default="sandboxed-python,sandboxed-python-bubblewrap,"
                        "sandboxed-python-gvisor")  # fmt: skip
    args = parser.parse_args()
    return asyncio.run(run(args.runs, args.kernels.split(","), args.pause))


if __name__ == "__main__":
    sys.exit(main())
