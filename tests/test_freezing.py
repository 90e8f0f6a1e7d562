"""Freezing idle servers on a real Hub (the shipped local configuration, real
configurable-http-proxy, bubblewrap and gVisor servers): the hibernator freezes a server
idle for ``--freeze-after`` seconds, every process of its sandbox stops (its cgroup's CPU
time does not move), and the next request through the proxy thaws it, the same kernel
answering with its variables; a busy kernel is never frozen; a frozen server hibernates
at its timeout and leaves nothing behind; the supervisor's socket that freezes is
root's alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_fixtures import Hub, login

from sandbox_provisioner.limits import CGROUP_ROOT, cgroup_relpath
from sandbox_spawner import freezing

#: A kernel's state to find again, and work that goes on with the kernel idle: a thread
#: of the kernel's and a process of its own session, both spinning.
STATE = """
x = 41
big = list(range(2_000_000))
import itertools, subprocess, sys, threading
def spin():
    global n
    for n in itertools.count():
        pass
threading.Thread(target=spin, daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
print("ready")
"""


def freezing_hub(make_hub, runtime: str, hibernate_after: float, freeze_after: float) -> Hub:
    return make_hub(hibernate_after, "--interval=1", runtime=runtime,
                    env={"JUPYTER_SANDBOX_FREEZE_AFTER": str(freeze_after)})  # fmt: skip


async def metrics(hub: Hub) -> dict[str, float]:
    """The service's Prometheus samples, by name and labels."""
    from tornado.httpclient import AsyncHTTPClient

    text = (await AsyncHTTPClient().fetch(f"http://127.0.0.1:{hub.service_port}/metrics")).body
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def sandbox_group(state: dict) -> str:
    """The cgroup of the server's sandbox (bubblewrap: its name; runsc: ``kernel-`` it)."""
    plan = json.loads((Path(state["state_dir"]) / "plan.json").read_text())
    name = plan["spec"]["kernel_id"]
    for relpath in (cgroup_relpath(name), cgroup_relpath(f"kernel-{name}")):
        if (CGROUP_ROOT / "freezer" / relpath).is_dir():
            return relpath
    raise AssertionError(f"no freezer cgroup for {name}")


def cpu_time(relpath: str) -> int:
    return int((CGROUP_ROOT / "cpuacct" / relpath / "cpuacct.usage").read_text())


async def wait_state(state: dict, wanted: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await freezing.request(state["freezer"], {"do": "status"})
        if status["state"] == wanted:
            return status
        await asyncio.sleep(0.3)
    raise AssertionError(f"not {wanted} within {timeout}s: {status}")


@pytest.mark.parametrize("runtime", ["bubblewrap", "gvisor"])
async def test_an_idle_server_freezes_and_the_next_request_thaws_it(make_hub, runtime):
    hub = freezing_hub(make_hub, runtime, hibernate_after=3600, freeze_after=3)
    await hub.spawn("fay")
    token, state = await hub.user_token("fay"), await hub.state("fay")
    kernel = await hub.kernel("fay", token)
    ws = await hub.channels("fay", token, kernel)  # a browser's, kept open throughout
    assert (await hub.execute("fay", token, STATE, kernel_id=kernel, ws=ws)).strip() == "ready"
    group = sandbox_group(state)
    spinning = cpu_time(group)
    await asyncio.sleep(1)
    assert cpu_time(group) - spinning > 2e8, "the kernel's thread and child spin"

    status = await wait_state(state, "frozen", 60)
    assert status["last_activity"], status  # kept for the hibernator's later sweeps
    assert (CGROUP_ROOT / "freezer" / group / "freezer.state").read_text().strip() == "FROZEN"
    frozen = cpu_time(group)
    await asyncio.sleep(3)
    assert cpu_time(group) == frozen, "no process of the sandbox ran while frozen"
    counts = await metrics(hub)
    assert counts['jupyter_sandbox_servers{state="frozen"}'] == 1.0, counts
    assert counts["jupyter_sandbox_freezes_total"] >= 1, counts
    assert "froze fay: active" in hub.log.read_text()
    user = await hub.api("GET", "/users/fay")
    assert user["servers"][""]["ready"], "the Hub still sees it running"

    # The next message on the websocket left open thaws it; the same kernel answers.
    out = await hub.execute("fay", token, "print(x + 1, len(big), n > 0)", kernel_id=kernel,
                            ws=ws)  # fmt: skip
    assert out.split() == ["42", "2000000", "True"]
    assert (await freezing.request(state["freezer"], {"do": "status"}))["state"] == "running"
    thawed = cpu_time(group)
    await asyncio.sleep(1)
    assert cpu_time(group) - thawed > 2e8, "its work goes on where it stopped"

    # Frozen again, a new connection (a new visit) thaws it too; the kernel was never
    # restarted.
    await wait_state(state, "frozen", 60)
    kernels = await hub.server_api("fay", token, "GET", "/api/kernels")
    assert [k["id"] for k in kernels] == [kernel]
    log = (Path(state["state_dir"]) / "supervisor.log").read_text()
    assert "thawed the server in" in log
    ws.close()
    # The thaws' durations reached the service's metrics (a sweep reads them).
    thaws = (await metrics(hub))['jupyter_sandbox_resume_seconds_count{strategy="freeze"}']
    assert thaws >= 1, thaws


async def test_a_busy_kernel_is_never_frozen_and_a_frozen_server_hibernates(make_hub):
    hub = freezing_hub(make_hub, "bubblewrap", hibernate_after=12, freeze_after=2)
    await hub.spawn("bea")
    token, state = await hub.user_token("bea"), await hub.state("bea")
    await hub.run_detached("bea", token, "import time\ntime.sleep(10)")
    await asyncio.sleep(6)  # several sweeps, idle long enough, but its kernel is busy
    status = await freezing.request(state["freezer"], {"do": "status"})
    assert status["state"] == "running", status
    assert "froze bea" not in hub.log.read_text()

    await wait_state(state, "frozen", 60)  # the computation ended: idle, frozen
    group = sandbox_group(state)
    assert await hub.stops_within("bea", 60), "hibernated at its timeout, frozen"
    assert "hibernating bea: frozen, idle for" in hub.log.read_text()
    assert not (CGROUP_ROOT / "freezer" / group).exists(), "nothing of it is left"
    assert not Path(state["freezer"]).exists()
    await hub.spawn("bea")  # and it resumes as after any hibernation
    token = await hub.user_token("bea")
    assert (await hub.execute("bea", token, "print(6 * 7)")).strip() == "42"


async def test_only_root_reaches_the_freezer(make_hub):
    """The user's own host uid cannot reach the supervisor's socket (to thaw or freeze
    servers, or to learn of them), nor can the server's sandbox see it."""
    hub = freezing_hub(make_hub, "bubblewrap", hibernate_after=3600, freeze_after=600)
    await hub.spawn("uma")
    token, state = await hub.user_token("uma"), await hub.state("uma")
    path = state["freezer"]
    mode = os.stat(path).st_mode & 0o777
    assert mode == 0o600 and os.stat(path).st_uid == 0, oct(mode)
    plan = json.loads((Path(state["state_dir"]) / "plan.json").read_text())
    uid = plan["spec"]["identity"]["uid"]  # the user's own host uid
    assert uid != 0
    attempt = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
               "try:\n    s.connect(sys.argv[1]); print('connected')\n"
               "except OSError as e:\n    print(type(e).__name__)\n")  # fmt: skip
    as_user = subprocess.run([sys.executable, "-c", attempt, path], user=uid, group=uid,
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert as_user.stdout.strip() == "PermissionError", as_user
    inside = await hub.execute("uma", token, f"import os; print(os.path.exists({path!r}))")
    assert inside.strip() == "False"
    # Nor does a request that is not the protocol's do anything: too long, it is cut off;
    # not JSON, or unknown, it is refused.
    for request, expected in [
        (b"{" * 5000 + b"\n", b""),
        (b"\xff\n", b'{"ok": false, "reason": "not a JSON object"}\n'),
        (b'{"do": "kill"}\n', b'{"ok": false, "reason": "unknown request \'kill\'"}\n'),
    ]:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(request)
        await writer.drain()
        assert await reader.read() == expected
        writer.close()
    assert (await freezing.request(path, {"do": "status"}))["state"] == "running"


def notebook(*sources: str) -> dict:
    return {"type": "notebook", "content": {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "source": source, "metadata": {},
                   "outputs": [], "execution_count": None} for i, source in enumerate(sources)],
    }}  # fmt: skip


async def test_an_open_jupyterlab_goes_on_across_a_freeze(make_hub, browser):
    """A JupyterLab left open while its server was frozen: its next cell runs in the same
    kernel, with its variables, without a reload or a "kernel restarted" dialog."""
    hub = freezing_hub(make_hub, "bubblewrap", hibernate_after=3600, freeze_after=600)
    page = await browser.new_page()
    await login(page, hub, "lena")
    await page.wait_for_url("**/user/lena/lab**", timeout=120_000)
    token, state = await hub.user_token("lena"), await hub.state("lena")
    await hub.server_api("lena", token, "PUT", "/api/contents/kept.ipynb",
                         notebook("x = 41\nprint('set')", "print(x + 1)"))  # fmt: skip
    await page.goto(f"{hub.url}/user/lena/lab/tree/kept.ipynb")
    await page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=60_000)
    await page.evaluate("window.notReloaded = true")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the notebook's kernel is up and idle
        sessions = await hub.server_api("lena", token, "GET", "/api/sessions")
        if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
            break
        await asyncio.sleep(0.5)
    kernel = sessions[0]["kernel"]["id"]
    await page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    await page.keyboard.press("Shift+Enter")
    outputs = page.locator(".jp-Notebook .jp-OutputArea-output")
    await outputs.filter(has_text="set").first.wait_for(timeout=60_000)

    for _ in range(50):  # the page polls the server: a poll during the freeze calls it off
        answer = await freezing.request(state["freezer"], {"do": "freeze", "quiet": 0})
        if answer["ok"]:
            break
        await asyncio.sleep(0.1)
    assert answer["ok"] and answer["state"] == "frozen", answer
    await asyncio.sleep(2)  # the page's next poll (or this cell) thaws it
    await page.keyboard.press("Shift+Enter")  # the second cell, selected after the first
    await outputs.filter(has_text="42").first.wait_for(timeout=60_000)
    assert await page.evaluate("window.notReloaded === true")
    assert await page.locator(".jp-Dialog").count() == 0
    sessions = await hub.server_api("lena", token, "GET", "/api/sessions")
    assert [s["kernel"]["id"] for s in sessions] == [kernel]
    log = (Path(state["state_dir"]) / "supervisor.log").read_text()
    assert "thawed the server in" in log


#: Writes and syncs without end: the kernel's freezer takes tens of milliseconds to stop
#: it (a wider window for a stop to come during a freeze).
SLOW_TO_FREEZE = """
import os, threading
def loop():
    block = b"x" * (1 << 20)
    while True:
        with open("big", "wb") as f:
            for _ in range(300):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
threading.Thread(target=loop, daemon=True).start()
print("ok")
"""


@pytest.mark.parametrize("runtime", ["gvisor"])  # bubblewrap's signals never waited
async def test_a_stop_during_a_freeze_leaves_nothing_frozen(make_hub, runtime):
    """The review's race: the user stops their server (their own token) just as the
    hibernator freezes it. The freeze was still stopping processes when the stop's thaw
    came, froze them again, and runsc's signal waited on a frozen Sentry: the Hub killed
    the supervisor after 20 s and the sandbox stayed frozen, its memory held, for good."""
    hub = freezing_hub(make_hub, runtime, hibernate_after=3600, freeze_after=600)
    for delay in (0.0, 0.01, 0.02, 0.03, 0.05):
        await hub.spawn("eve")
        token, state = await hub.user_token("eve"), await hub.state("eve")
        group = sandbox_group(state)
        kernel = await hub.kernel("eve", token)
        assert (await hub.execute("eve", token, SLOW_TO_FREEZE, kernel_id=kernel)).strip() == "ok"
        freeze = asyncio.ensure_future(freezing.request(state["freezer"],
                                                        {"do": "freeze", "quiet": 0}))  # fmt: skip
        await asyncio.sleep(delay)
        began = time.monotonic()
        await hub.api("DELETE", "/users/eve/server", token=token)
        await hub.wait_stopped("eve", 90)
        assert time.monotonic() - began < 15, "the stop waited on a frozen sandbox"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(freeze, 5)
        assert not (CGROUP_ROOT / "freezer" / group).exists(), f"left at {delay}s: {group}"


@pytest.mark.parametrize("runtime", ["bubblewrap", "gvisor"])
async def test_a_supervisor_killed_while_frozen_leaves_nothing(make_hub, runtime):
    """A supervisor killed (OOM killer, an administrator) while its server is frozen: the
    parent-death signal waits, pending, in frozen processes. The Hub's stop ends them."""
    hub = freezing_hub(make_hub, runtime, hibernate_after=3600, freeze_after=600)
    await hub.spawn("kim")
    state = await hub.state("kim")
    group = sandbox_group(state)
    answer = await freezing.request(state["freezer"], {"do": "freeze", "quiet": 0})
    assert answer["ok"], answer
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    await asyncio.sleep(2)
    assert (CGROUP_ROOT / "freezer" / group / "cgroup.procs").read_text().split(), \
        "frozen, the sandbox outlives its supervisor"  # fmt: skip
    await hub.api("DELETE", "/users/kim/server")
    await hub.wait_stopped("kim", 60)
    assert not (CGROUP_ROOT / "freezer" / group).exists()
    await hub.spawn("kim")  # and it starts again, in a group of its own name
    token = await hub.user_token("kim")
    assert (await hub.execute("kim", token, "print(6 * 7)")).strip() == "42"


async def test_a_stop_calls_off_a_freeze_in_progress():
    """The same race, made certain: a freeze the kernel takes its time over (here, one
    that has not finished) is called off by the stop, which leaves the sandbox thawed,
    and no freeze is begun after it. (The sandbox is a stand-in that only records what is
    done to it: the race itself is the test above, on a real server.)"""
    from sandbox_provisioner.runtimes.base import Sandbox

    class Slow(Sandbox):
        thawed = 0
        poll = wait = send_signal = terminate = kill = cleanup = info = None  # type: ignore

        async def freeze(self) -> None:
            try:
                await asyncio.Event().wait()  # the kernel still stopping its processes
            except asyncio.CancelledError:
                self.thaw()  # as freeze_cgroup does when called off
                raise

        def thaw(self) -> None:
            self.thawed += 1

    sandbox = Slow.__new__(Slow)
    freezer = freezing.Freezer(sandbox)
    freezer.last_traffic -= 60
    pending = asyncio.ensure_future(freezer.handle({"do": "freeze", "quiet": 0}))
    await asyncio.sleep(0.05)
    freezer.stop()
    answer = await pending
    assert answer["ok"] is False and answer["state"] == "running", answer
    assert sandbox.thawed >= 2  # the stop's thaw, and the called-off freeze's own
    again = await freezer.handle({"do": "freeze", "quiet": 0})
    assert again["ok"] is False and "stopping" in again["reason"], again
