"""The kernel agent and its protocol, as a real process on loopback with a real ipykernel.

The cluster tests drive it inside pods; here it runs on its own, which is enough to
check the handshake (one controller, nothing forged), restart in place and stray
processes. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from jupyter_client.asynchronous import AsyncKernelClient

from sandbox_provisioner.agent.client import AgentClient, AgentError
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
    key = load_or_create_signing_key(tmp_path / "controller.pem")
    port = free_port()
    env = {**os.environ, CONTROLLER_KEYS_ENV: public_key_text(key), "SECRET_OF_AGENT": "x"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox_provisioner.agent", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--workdir", str(tmp_path)],
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
