"""A real jupyter_server with the example configuration: REST sessions, websocket execution."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from testcluster.cluster import free_port

CONFIG = Path(__file__).parent.parent / "jupyter_config" / "jupyter_server_config.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _server(tmp_path_factory)


@pytest.fixture(scope="module")
def failing_server(tmp_path_factory):
    """The shipped configuration, with a launch timeout no kernel can meet."""
    yield from _server(tmp_path_factory, "--SandboxProvisioner.launch_timeout=0.001")


def _server(tmp_path_factory, *args: str):
    root = tmp_path_factory.mktemp("server-root")
    (root / "project").mkdir()
    port, token = free_port(), uuid.uuid4().hex
    log = open(root.parent / "server.log", "w")  # noqa: SIM115 (closed below)
    env = {**os.environ, "JUPYTERHUB_API_TOKEN": "hub-secret-must-not-leak"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--config={CONFIG}", "--no-browser",
         f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
         *args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    else:
        proc.kill()
    if proc.poll() is not None:
        log.close()
        pytest.fail("jupyter_server did not start:\n" + (root.parent / "server.log").read_text())
    yield {"base": base, "token": token, "root": root}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


async def api(server, method: str, path: str, body: object | None = None,
              expect: int | None = None) -> object:  # fmt: skip
    """The JSON answer; with ``expect``, the answer of a request that must get that code."""
    request = HTTPRequest(
        f"{server['base']}{path}",
        method=method,
        headers={"Authorization": f"token {server['token']}"},
        body=None if body is None else json.dumps(body),
        allow_nonstandard_methods=True,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=expect is None)
    if expect is not None:
        assert response.code == expect, (response.code, response.body)
    return json.loads(response.body) if response.body else None


async def execute_over_websocket(server, kernel_id: str, code: str) -> tuple[str, str]:
    session = uuid.uuid4().hex
    url = server["base"].replace("http", "ws") + f"/api/kernels/{kernel_id}/channels"
    ws = await websocket_connect(
        HTTPRequest(
            f"{url}?session_id={session}", headers={"Authorization": f"token {server['token']}"}
        )
    )
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": session,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False},
    }))  # fmt: skip
    # Shell and iopub are separate channels: done when the reply and the idle status both came.
    stdout, status, idle = "", "", False
    deadline = time.monotonic() + 120
    while not (status and idle) and time.monotonic() < deadline:
        msg = json.loads(await ws.read_message())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            stdout += msg["content"]["text"]
        elif msg["msg_type"] == "execute_reply":
            status = msg["content"]["status"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    ws.close()
    return status, stdout


async def test_only_sandboxed_kernels_are_offered(server):
    specs = await api(server, "GET", "/api/kernelspecs")
    assert specs["default"] == "sandboxed-python"
    assert set(specs["kernelspecs"]) == {
        "sandboxed-python",
        "sandboxed-python-gvisor",
        "sandboxed-python-bubblewrap",
    }


@pytest.mark.parametrize("kernel_name", ["sandboxed-python-bubblewrap", "sandboxed-python-gvisor"])
async def test_session_execute_shutdown(server, kernel_name):
    from conftest import require_runtime

    require_runtime(kernel_name.rsplit("-", 1)[1])
    session = await api(server, "POST", "/api/sessions", {
        "path": "project/analysis.ipynb", "type": "notebook", "name": "analysis.ipynb",
        "kernel": {"name": kernel_name},
    })  # fmt: skip
    kernel_id = session["kernel"]["id"]
    try:
        code = (
            "import os\n"
            "print(os.getcwd(), os.environ['JUPYTER_SANDBOX_RUNTIME'],"
            " 'JUPYTERHUB_API_TOKEN' in os.environ)"
        )
        status, out = await execute_over_websocket(server, kernel_id, code)
        assert status == "ok"
        cwd, runtime, leaked = out.split()
        assert cwd == str(server["root"] / "project")
        assert runtime == kernel_name.rsplit("-", 1)[1]
        assert leaked == "False"
    finally:
        await api(server, "DELETE", f"/api/sessions/{session['id']}")
    kernels = await api(server, "GET", "/api/kernels")
    assert kernel_id not in [k["id"] for k in kernels]


async def test_a_failed_start_tells_the_client_why(failing_server):
    """The REST answer (what JupyterLab's "Error Starting Kernel" dialog shows) carries the
    sandbox's own message, not "Unhandled error"; no kernel is left, nor its directory."""
    from test_errors import state_dirs

    before = state_dirs()
    for path, body in (
        ("/api/kernels", {"name": "sandboxed-python-bubblewrap"}),
        ("/api/sessions", {"path": "project/a.ipynb", "type": "notebook", "name": "a.ipynb",
                           "kernel": {"name": "sandboxed-python-bubblewrap"}}),
    ):  # fmt: skip
        answer = await api(failing_server, "POST", path, body, expect=500)
        assert "launch_timeout=0.001s" in answer["message"], answer
        assert "raise SandboxProvisioner.launch_timeout" in answer["message"], answer
    assert await api(failing_server, "GET", "/api/kernels") == []
    assert state_dirs() - before == set()


@pytest.mark.parametrize("kernel_name", ["sandboxed-python-bubblewrap", "sandboxed-python-gvisor"])
async def test_the_example_notebook_probes_this_servers_port(server, kernel_name):
    """what-the-sandbox-blocks tries the port of the server that started the kernel (not a
    guess: this server's port is random), and is blocked; an unsandboxed kernel would not be."""
    from conftest import require_runtime

    require_runtime(kernel_name.rsplit("-", 1)[1])
    notebook = json.loads((Path(__file__).parent.parent / "examples" / "notebooks"
                           / "what-the-sandbox-blocks.ipynb").read_text())  # fmt: skip
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    attempt = next(c for c in cells if c.startswith("def attempt"))
    network = next(c for c in cells if "Jupyter server" in c)
    kernel = await api(server, "POST", "/api/kernels", {"name": kernel_name})
    try:
        status, out = await execute_over_websocket(server, kernel["id"], attempt + "\n" + network)
    finally:
        await api(server, "DELETE", f"/api/kernels/{kernel['id']}")
    port = server["base"].rsplit(":", 1)[1]
    assert status == "ok", out
    assert f"BLOCKED  connect to the host's Jupyter server (port {port})" in out, out
    assert "ALLOWED" not in out, out
