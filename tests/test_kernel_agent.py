"""The kernel agent and its protocol, as a real process on loopback with a real ipykernel.

The cluster tests drive it inside pods; here it runs on its own, which is enough to
check the handshake (one controller, nothing forged), restart in place and stray
processes. Nothing is mocked.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KERNEL_AGE, wait_until
from jupyter_client.asynchronous import AsyncKernelClient

from sandbox_provisioner import pool
from sandbox_provisioner.agent.client import AgentClient, AgentError
from sandbox_provisioner.agent.kernel import BANNER_ARG
from sandbox_provisioner.agent.protocol import (
    CONTROLLER_KEYS_ENV,
    Refused,
    load_or_create_signing_key,
    parse_public_keys,
    public_key_text,
)
from testcluster.cluster import free_port


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[dict]:
    async for running in _agent(tmp_path):
        yield running


@pytest.fixture(params=["ipc", "tcp"])
async def prepared_agent(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict]:
    """An agent told to prepare its first kernel: on an IPC endpoint as a pool member's, or
    on TCP ports of its own address as a pod's."""
    if request.param == "ipc":
        (tmp_path / "ipc").mkdir()
        endpoint: dict | None = pool.kernel_endpoint(tmp_path)
        wanted = endpoint
    else:
        endpoint, wanted = None, {"transport": "tcp"}  # the start asks for none
    prepare = json.dumps({"connection": wanted, "args": []})
    async for running in _agent(tmp_path, "--prepare", prepare):
        yield {**running, "endpoint": endpoint}


async def _agent(tmp_path: Path, *more: str) -> AsyncIterator[dict]:
    key = load_or_create_signing_key(tmp_path / "controller.pem")
    port = free_port()
    env = {**os.environ, CONTROLLER_KEYS_ENV: public_key_text(key), "SECRET_OF_AGENT": "x"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox_provisioner.agent", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--workdir", str(tmp_path), *more],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = ("127.0.0.1", port)
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection(*address)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    yield {"address": address, "key": key, "proc": proc, "tmp": tmp_path}
    proc.terminate()
    proc.wait(timeout=20)


async def client_for(reply: dict, agent: AgentClient) -> AsyncKernelClient:
    kc = AsyncKernelClient()
    kc.load_connection_info({**reply["connection"], "key": agent.kernel_key})
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    return kc


async def run(kc: AsyncKernelClient, code: str) -> dict:
    return (await kc.execute(code, reply=True, timeout=30))["content"]


async def value(kc: AsyncKernelClient, expr: str) -> Any:
    """``expr`` evaluated in the kernel (``os`` imported), parsed back from its repr."""
    reply = await kc.execute("import os", user_expressions={"v": expr}, reply=True, timeout=30)
    found = reply["content"]["user_expressions"]["v"]
    assert found["status"] == "ok", found
    return ast.literal_eval(found["data"]["text/plain"])


def _prepared_pid(agent: dict) -> int:
    """The pid of the kernel the agent prepared at boot, from its log."""
    seen = b""
    for _ in range(600):
        seen += _agent_output(agent)
        if found := re.search(rb"kernel (\d+) prepared for the first start", seen):
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no kernel prepared: {seen.decode(errors='replace')}")


async def test_the_first_start_takes_the_kernel_prepared_at_boot(prepared_agent):
    """The prepared kernel becomes the notebook's: the real key, its directory (also as
    IPython recorded it), its variables, its banner; a restart in place forks anew."""
    ctl = await AgentClient.claim(prepared_agent["address"], prepared_agent["key"])
    prepared = _prepared_pid(prepared_agent)
    await asyncio.sleep(2)  # it waits, initialized
    notebook = prepared_agent["tmp"] / "notebook"
    notebook.mkdir()
    banner = f"{BANNER_ARG}Sandboxed kernel: test (warm start)\n"
    reply = await ctl.request("start", args=[banner], cwd=str(notebook),
                              env={"GIVEN": "yes", "JPY_SESSION_NAME": "notebook/a.ipynb"},
                              connection=prepared_agent["endpoint"])  # fmt: skip
    assert reply["pid"] == prepared
    kc = await client_for(reply, ctl)  # signed with the real key, or no reply
    assert await value(kc, KERNEL_AGE) > 1.5
    assert await value(kc, "os.getcwd()") == str(notebook)
    assert await value(kc, "[str(d) for d in _dh]") == [str(notebook)]
    assert await value(kc, "get_ipython().starting_dir") == str(notebook)
    assert await value(kc, "__session__") == "notebook/a.ipynb"
    assert await value(kc, "os.environ['GIVEN']") == "yes"
    info = await kc.kernel_info(reply=True, timeout=30)
    assert "Sandboxed kernel: test (warm start)" in info["content"]["banner"]
    kc.stop_channels()

    await ctl.request("stop", grace=0)
    again = await ctl.request("start", args=[], env={}, connection=prepared_agent["endpoint"])
    assert again["pid"] != prepared
    kc = await client_for(again, ctl)
    assert await value(kc, KERNEL_AGE) < 1.5
    kc.stop_channels()


@pytest.mark.parametrize("differs", ["args", "env"])
async def test_a_start_the_prepared_kernel_does_not_fit_forks_one(prepared_agent, differs):
    """Other arguments, or a variable a kernel reads while it initializes: a kernel is
    forked for the start, and the prepared one ends."""
    ctl = await AgentClient.claim(prepared_agent["address"], prepared_agent["key"])
    prepared = _prepared_pid(prepared_agent)
    await asyncio.sleep(1)
    args = ["--HistoryManager.enabled=False"] if differs == "args" else []
    env = {"PYTHONHASHSEED": "7"} if differs == "env" else {}
    reply = await ctl.request("start", args=args, env=env,
                              connection=prepared_agent["endpoint"])  # fmt: skip
    assert reply["pid"] != prepared
    assert wait_until(lambda: not os.path.exists(f"/proc/{prepared}"), timeout=10)
    kc = await client_for(reply, ctl)
    assert await value(kc, KERNEL_AGE) < 1.0
    if differs == "env":
        assert await value(kc, "os.environ['PYTHONHASHSEED']") == "7"
    else:
        assert await value(kc, "get_ipython().history_manager.enabled") is False
    kc.stop_channels()


async def test_start_restart_in_place_and_strays(agent):
    ctl = await AgentClient.claim(agent["address"], agent["key"])
    reply = await ctl.request("start", args=[], env={"GIVEN": "yes"})
    kc = await client_for(reply, ctl)
    assert (await run(kc, "import os; assert os.environ['GIVEN'] == 'yes'"))["status"] == "ok"
    # The agent's own environment (its controller key) is not the kernel's.
    result = await run(kc, "assert 'JUPYTER_SANDBOX_CONTROLLER_KEYS' not in os.environ")
    assert result["status"] == "ok"
    assert (await run(kc, f"assert os.getcwd() == {str(agent['tmp'])!r}"))["status"] == "ok"
    # A grandchild that escapes the kernel's process group is still ended by a stop.
    code = "import subprocess; subprocess.Popen(['setsid', 'sleep', '6061'])"
    assert (await run(kc, code))["status"] == "ok"
    await asyncio.sleep(0.3)
    assert subprocess.run(["pgrep", "-f", "sleep 6061"], capture_output=True).stdout
    first_pid = reply["pid"]

    stopped = await ctl.request("stop", grace=0)
    assert stopped["exit_code"] == -signal.SIGKILL
    again = await ctl.request("start", args=[], env={})
    assert again["pid"] != first_pid
    # Same endpoint and key: the old client keeps working after the restart.
    assert again["connection"] == reply["connection"]
    kc.stop_channels()
    kc = await client_for(again, ctl)
    assert (await run(kc, "x = 1"))["status"] == "ok"
    assert not subprocess.run(["pgrep", "-f", "sleep 6061"], capture_output=True).stdout
    kc.stop_channels()


async def test_one_controller_only(agent, tmp_path: Path):
    stranger = load_or_create_signing_key(tmp_path / "stranger.pem")
    with pytest.raises(Refused, match="not signed by a controller key"):
        await AgentClient.claim(agent["address"], stranger)
    ctl = await AgentClient.claim(agent["address"], agent["key"])
    with pytest.raises(Refused, match="already claimed"):
        await AgentClient.claim(agent["address"], agent["key"])
    with pytest.raises(Refused, match="not this sandbox's controller"):
        await AgentClient.resume(agent["address"], os.urandom(32))
    # The real controller, from a new connection (a restarted server), is accepted.
    again = await AgentClient.resume(agent["address"], ctl.session)
    assert (await again.request("poll"))["exit_code"] == 0
    # A frame with a wrong MAC ends the connection without effect.
    again._channel._key = os.urandom(32)
    with pytest.raises(ConnectionError):
        await again.request("start", args=[])
    assert (await ctl.request("poll"))["exit_code"] == 0  # nothing was started
    with pytest.raises(AgentError, match="unknown request"):
        await ctl.request("format-disk")


async def test_garbage_is_dropped_and_the_agent_lives_on(agent):
    reader, writer = await asyncio.open_connection(*agent["address"])
    assert b'"agent": "jupyter-sandbox"' in (await reader.readline()).replace(b'":"', b'": "')
    writer.write(b"\x00\xffnot json\n")
    await writer.drain()
    assert await reader.read() == b""  # dropped
    ctl = await AgentClient.claim(agent["address"], agent["key"])
    assert (await ctl.request("poll"))["exit_code"] == 0


async def test_a_deeply_nested_frame_is_dropped(agent):
    """Before authentication, a frame nested past Python's recursion limit."""
    reader, writer = await asyncio.open_connection(*agent["address"])
    await reader.readline()
    writer.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    await writer.drain()
    assert await reader.read() == b""  # dropped
    assert b"RecursionError" not in _agent_output(agent)
    ctl = await AgentClient.claim(agent["address"], agent["key"])
    assert (await ctl.request("poll"))["exit_code"] == 0


async def test_unauthenticated_connections_are_bounded(agent):
    """Idle connections that never authenticate cannot pile up in the agent."""
    from sandbox_provisioner.agent.server import MAX_PENDING

    pid = agent["proc"].pid
    base = len(os.listdir(f"/proc/{pid}/fd"))
    idle = [await asyncio.open_connection(*agent["address"]) for _ in range(4 * MAX_PENDING)]
    await asyncio.sleep(0.5)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= base + MAX_PENDING + 2
    for _, writer in idle:
        writer.close()
    ctl = None
    for _ in range(100):  # the slots free up as the idle ones go
        try:
            ctl = await AgentClient.claim(agent["address"], agent["key"])
            break
        except (ConnectionError, OSError):
            await asyncio.sleep(0.1)
    assert ctl is not None and (await ctl.request("poll"))["exit_code"] == 0


def _agent_output(agent: dict) -> bytes:
    """What the agent has logged so far (without waiting for more)."""
    out = agent["proc"].stdout
    os.set_blocking(out.fileno(), False)
    return out.read() or b""


def test_controller_keys_are_checked():
    with pytest.raises(ValueError, match="does not start with ed25519:"):
        parse_public_keys("rsa:AAAA")
    with pytest.raises(ValueError, match="is not an Ed25519 key"):
        parse_public_keys("ed25519:AAAA")
    assert parse_public_keys(" , ") == []


def test_agent_refuses_to_start_without_a_key():
    out = subprocess.run(
        [sys.executable, "-m", "sandbox_provisioner.agent", "serve", "--port", "0"],
        env={k: v for k, v in os.environ.items() if k != CONTROLLER_KEYS_ENV},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no controller key" in out.stderr
