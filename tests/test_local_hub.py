"""A sandboxed JupyterHub on one machine: LocalSandboxSpawner with a real Hub and proxy.

Users are made and their servers started through the Hub's REST API and reached
through configurable-http-proxy, as a browser would; code runs in real kernels
of their servers. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from hub_fixtures import HTTPClientError, Hub, processes_of, supervisors


async def test_each_user_reaches_only_their_own_server(hub: Hub):
    await hub.spawn("alice")
    await hub.spawn("bob")
    alice = await hub.user_token("alice")
    assert "started" in await hub.server_api("alice", alice, "GET", "/api/status")
    with pytest.raises(HTTPClientError) as refused:
        await hub.server_api("bob", alice, "GET", "/api/status")
    assert refused.value.code in (403, 404)
    out = await hub.execute("alice", alice, "import os; print(os.getcwd(), os.environ['USER'])")
    assert out.split() == ["/home/jovyan", "alice"]


async def test_a_users_code_reaches_nothing_of_the_host_or_other_users(hub: Hub):
    await hub.spawn("alice")
    await hub.spawn("bob")
    alice = await hub.user_token("alice")
    bob_state = await hub.state("bob")
    bob_plan = json.loads((Path(bob_state["state_dir"]) / "plan.json").read_text())
    bob_token = bob_plan["spec"]["env"]["JUPYTERHUB_API_TOKEN"]
    ports = {"hub api": hub.hub_port, "proxy api": hub.api_port, "proxy": hub.proxy_port,
             "bob's server": bob_state["port"]}  # fmt: skip
    code = f"""
import os, socket, json
def reach(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False
def readable(path):
    try:
        return open(path, 'rb').read()
    except OSError:
        return b''
pids = [p for p in os.listdir('/proc') if p.isdigit()]
print(json.dumps({{
    "reached": [name for name, port in {ports!r}.items() if reach(port)],
    "bob's home": [p for p in ("/home/bob", {str(hub.root / "homes" / "bob")!r})
                   if os.path.exists(p)],
    "other homes": os.path.exists({str(hub.root / "homes")!r}),
    "bob's token": [p for p in pids if {bob_token!r}.encode() in
                    readable(f'/proc/{{p}}/environ') + readable(f'/proc/{{p}}/cmdline')]
                   + (["env"] if {bob_token!r} in repr(dict(os.environ)) else []),
}}))
open('mine.txt', 'w').write('alice')
"""
    found = json.loads((await hub.execute("alice", alice, code)).strip())
    assert found == {"reached": [], "bob's home": [], "other homes": False, "bob's token": []}
    # On the host, what alice writes belongs to her uid: no other user's, never root.
    alice_uid = (hub.root / "homes" / "alice").stat().st_uid
    assert (hub.root / "homes" / "alice" / "mine.txt").stat().st_uid == alice_uid
    assert alice_uid not in (0, (hub.root / "homes" / "bob").stat().st_uid)


async def test_stop_ends_every_process_and_the_home_stays(hub: Hub):
    await hub.spawn("carol")
    carol = await hub.user_token("carol")
    await hub.execute("carol", carol, "open('kept.txt', 'w').write('still here')")
    uid = (hub.root / "homes" / "carol").stat().st_uid
    supervisor = (await hub.state("carol"))["supervisor_pid"]
    assert processes_of(uid), "carol's server runs as her uid"
    await hub.api("DELETE", "/users/carol/server")
    await hub.wait_stopped("carol")
    assert not Path(f"/proc/{supervisor}").exists()
    assert processes_of(uid) == []
    await hub.spawn("carol")
    assert await hub.execute("carol", carol, "print(open('kept.txt').read())") == "still here\n"


async def test_a_hub_restart_finds_running_servers(hub: Hub):
    await hub.spawn("dave")
    dave = await hub.user_token("dave")
    before = await hub.state("dave")
    hub.stop()
    assert before["supervisor_pid"] in supervisors(hub.root)  # not ended with the Hub
    hub.start()
    user = await hub.wait_ready("dave", timeout=60)
    assert user["servers"][""]["state"]["supervisor_pid"] == before["supervisor_pid"]
    assert "started" in await hub.server_api("dave", dave, "GET", "/api/status")


async def test_one_users_fork_bomb_stays_in_their_sandbox(hub: Hub):
    await hub.spawn("erin")
    await hub.spawn("frank")
    erin, frank = await hub.user_token("erin"), await hub.user_token("frank")
    bomb = """
import os, time
children, error = [], None
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as exc:
        error = type(exc).__name__
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
open('bombed', 'w').write('')
time.sleep(4)  # held while the other user's server is asked
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(children), error)
"""
    bombing = asyncio.ensure_future(hub.execute("erin", erin, bomb, timeout=120))
    marker = hub.root / "homes" / "erin" / "bombed"
    for _ in range(300):
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.exists(), "the bomb went off"
    assert "started" in await hub.server_api("frank", frank, "GET", "/api/status")
    assert (await hub.execute("frank", frank, "print('fine')")).strip() == "fine"
    forked, error = (await bombing).split()
    assert int(forked) < 256 and error == "BlockingIOError"


async def test_one_users_memory_bomb_stays_in_their_sandbox(hub: Hub):
    """The Hub's test configuration gives each server 1 GiB: a process that grows past it
    is killed inside that user's sandbox; that user's server and the others answer."""
    await hub.spawn("erin")
    await hub.spawn("frank")
    erin, frank = await hub.user_token("erin"), await hub.user_token("frank")
    grow = (
        "held = []\n"
        "for i in range(48):\n"  # 3 GiB in 64 MiB pieces, written, not only reserved
        "    held.append(b'x' * (64 << 20))\n"
        "    open('grown', 'w').write(str(i + 1))\n"
    )
    bomb = (
        "import subprocess, sys\n"
        f"child = subprocess.run([sys.executable, '-c', {grow!r}])\n"
        "print(child.returncode, open('grown').read())\n"
    )
    code, grown = (await hub.execute("erin", erin, bomb, timeout=120)).split()
    assert int(code) in (-9, 1), code  # killed by the OOM killer, or MemoryError
    assert 64 * int(grown) < 1024 + 64, f"grew to {64 * int(grown)} MiB"
    assert "started" in await hub.server_api("erin", erin, "GET", "/api/status")
    assert (await hub.execute("frank", frank, "print('fine')")).strip() == "fine"


async def test_spawn_progress_says_what_happens(hub: Hub):
    await hub.api("POST", "/users/grace", raise_error=False)
    await hub.api("POST", "/users/grace/server")
    events = await hub.progress("grace")
    messages = [e.get("message", "") for e in events]
    assert any("sandbox" in m for m in messages), messages
    assert events[-1].get("ready") is True, events
    if os.geteuid() == 0:
        assert any("home" in m for m in messages)
    # Where the server runs and within what (the tests' Hub: 1 GiB and 256 processes).
    assert ("The server is up: a bubblewrap sandbox, 1 GiB of memory, 1 CPU, "
            "256 processes, no network") in messages, messages  # fmt: skip


async def test_kernels_are_named_for_their_sandbox(hub: Hub):
    """JupyterLab's Launcher and kernel picker read the server's kernel specs: they say
    the kernel is sandboxed, and by what; the kernel itself is as before."""
    await hub.spawn("kit")
    token = await hub.user_token("kit")
    specs = await hub.server_api("kit", token, "GET", "/api/kernelspecs")
    assert list(specs["kernelspecs"]) == ["python3"]
    spec = specs["kernelspecs"]["python3"]["spec"]
    assert spec["display_name"] == "Python 3 (sandboxed: bubblewrap)"
    assert spec["language"] == "python"
    assert (await hub.execute("kit", token, "print(6 * 7)")).strip() == "42"


async def test_the_shipped_configuration_logs_users_in_with_the_password(hub: Hub):
    """The Hub runs on jupyter_config/jupyterhub_config.py: its login page takes any name
    with the password scripts/hub prints, and nothing else."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    client = AsyncHTTPClient()
    page = await client.fetch(f"{hub.url}/hub/login")
    cookies = "; ".join(c.split(";")[0] for c in page.headers.get_list("Set-Cookie"))
    xsrf = next(c.split("=", 1)[1] for c in cookies.split("; ") if c.startswith("_xsrf="))

    async def login(password: str) -> int:
        response = await client.fetch(HTTPRequest(
            f"{hub.url}/hub/login", method="POST", follow_redirects=False,
            headers={"Cookie": cookies, "Content-Type": "application/x-www-form-urlencoded"},
            body=f"username=heidi&password={password}&_xsrf={xsrf}",
        ), raise_error=False)  # fmt: skip
        return response.code

    assert await login("wrong-password") == 403
    assert await login(hub.password) == 302


async def test_a_trial_hub_stops_every_server_on_ctrl_c(tmp_path_factory):
    """scripts/hub's trial mode: Ctrl+C (SIGINT) stops the Hub and every user's server,
    homes kept; the shipped default (a production Hub) leaves them running, as the restart
    test above shows."""
    import signal

    from conftest import require_runtime
    from hub_fixtures import end_supervisors

    require_runtime("bubblewrap")
    root = tmp_path_factory.mktemp("trial-hub")
    hub = Hub(root, env={"JUPYTER_SANDBOX_HUB_STOP_SERVERS_ON_EXIT": "1"}).start()
    try:
        for name in ("tia", "tom"):
            await hub.spawn(name)
        token = await hub.user_token("tia")
        await hub.execute("tia", token, "open('kept.txt', 'w').write('yes')")
        uid = (root / "homes" / "tia").stat().st_uid
        assert len(supervisors(root)) == 2 and processes_of(uid)
        hub.stop(signal.SIGINT)
        assert supervisors(root) == [], "every server stopped with the Hub"
        assert processes_of(uid) == []
        assert (root / "homes" / "tia" / "kept.txt").read_text() == "yes"
    finally:
        hub.close()
        end_supervisors(root)
