"""The Hub's boundaries between users, attacked from a user's own server, as the security
review did: a real Hub with its proxy (the shipped configuration), real servers under
bubblewrap and under gVisor (restored from the server template), real kernels.

* the hibernator's question reaches a server whose socket the user's code took over:
  nothing in it opens anything of the Hub's or of another user's;
* a link put in place of the server's socket does not lead the supervisor (root) to
  another socket;
* two names that the old escaping made one ("josé", "jos-e9-") get two homes, and a
  home that belongs to another uid is refused, not taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_fixtures import Hub, end_supervisors
from test_local_hub_gvisor import template_ready
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from sandbox_spawner.hub_instance import slug

#: The service asks every second (its timeout stays an hour: nothing hibernates here).
ASK_EVERY_SECOND = "c.JupyterHub.services[0]['command'].append('--interval=1')\n"

#: Run in a user's server: take over its socket, relay to the real one, and record every
#: byte that arrives (what the review's attack did).
RELAY = r"""
import os, socket, threading
RUN = "/run/jupyter-sandbox"
sock, real = RUN + "/server.sock", RUN + "/server.real"
os.rename(sock, real)
listener = socket.socket(socket.AF_UNIX)
listener.bind(sock)
listener.listen(16)
log = open(os.path.expanduser("~/captured.bin"), "ab", buffering=0)
open(os.path.expanduser("~/relay-up"), "w").write("up")
def pump(src, dst, record):
    try:
        while data := src.recv(65536):
            if record:
                log.write(data)
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    client, _ = listener.accept()
    upstream = socket.socket(socket.AF_UNIX)
    upstream.connect(real)
    threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
"""


def detached(code: str) -> str:
    """Kernel code that starts ``code`` as a process of its own in the server's sandbox."""
    return ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', {code!r}], start_new_session=True,\n"
            "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n")  # fmt: skip


@pytest.fixture(scope="module", params=["bubblewrap", "gvisor"])
def boundary_hub(request, tmp_path_factory) -> Iterator[Hub]:
    """A Hub of the shipped configuration whose hibernator asks every second; under gVisor,
    users' servers are restored from the template (built by a first user's start)."""
    from conftest import require_runtime

    require_runtime(request.param)
    root = tmp_path_factory.mktemp(f"boundary-{request.param}")
    hub = Hub(root, runtime=request.param, extra_config=ASK_EVERY_SECOND).start()
    try:
        if request.param == "gvisor":
            asyncio.run(_build_template(hub))
        yield hub
    finally:
        hub.close()
        end_supervisors(root)


async def _build_template(hub: Hub) -> None:
    await hub.spawn("warmup")
    await template_ready(hub)
    await hub.api("DELETE", "/users/warmup/server")
    await hub.wait_stopped("warmup")


def home(hub: Hub, name: str) -> Path:
    return hub.root / "homes" / slug(name)


async def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} within {timeout}s")


def header_values(captured: bytes) -> set[str]:
    """Every header value in the requests ``captured`` holds, and its last word (a token
    after its scheme)."""
    values: set[str] = set()
    for block in captured.split(b"\r\n\r\n"):
        for line in block.split(b"\r\n")[1:]:
            if b":" in line:
                value = line.split(b":", 1)[1].strip().decode(errors="replace")
                values |= {value, value.split()[-1]} if value else set()
    return {v for v in values if len(v) >= 8}


async def status(url: str, method: str = "GET", token: str = "") -> int:
    response = await AsyncHTTPClient().fetch(HTTPRequest(
        url, method=method, headers={"Authorization": f"token {token}"},
        allow_nonstandard_methods=True, follow_redirects=False, request_timeout=30,
    ), raise_error=False)  # fmt: skip
    return response.code


async def test_the_hibernators_question_opens_nothing_to_the_server_that_hears_it(
    boundary_hub: Hub,
):
    """Finding 1: the hibernator sent its Hub token to every server; a server that relayed
    its own socket logged it and, with it, stopped another user's server."""
    hub = boundary_hub
    await hub.spawn("vera")
    vera = await hub.user_token("vera")
    await hub.execute("vera", vera, "open('secret.txt', 'w').write('vera only')")
    await hub.spawn("mallory")
    mallory = await hub.user_token("mallory")
    await hub.execute("mallory", mallory, detached(RELAY))
    captured = home(hub, "mallory") / "captured.bin"
    await wait_for((home(hub, "mallory") / "relay-up").exists, 30, "the relay is up")
    # The tests send mallory's server nothing now: what arrives is the hibernator's.
    await wait_for(lambda: b"\r\n\r\n" in captured.read_bytes() if captured.exists() else 0,
                   30, "the hibernator asked mallory's server")  # fmt: skip
    await asyncio.sleep(2)  # a few more sweeps
    heard = captured.read_bytes()
    # Everything it carried, used as the review's attack used the token it found.
    for value in header_values(heard):
        assert await status(f"{hub.url}/hub/api/users/vera", token=value) in (401, 403, 404)
        assert await status(f"{hub.url}/hub/api/users/vera/server", "DELETE", value) in (
            401, 403, 404)  # fmt: skip
        assert await status(f"{hub.url}/user/vera/api/contents/secret.txt", token=value) != 200
    assert b"authorization" not in heard.lower()
    assert b"/api/sandbox/activity" in heard  # the question, heard by the user's relay
    assert (await hub.api("GET", "/users/vera"))["servers"][""]["ready"]
    assert await hub.execute("vera", vera, "print(open('secret.txt').read())") == "vera only\n"


class RootOnlySocket:
    """An HTTP answer on a Unix socket in a directory only root enters."""

    ANSWER = b"root-only-answered"

    def __init__(self, directory: Path):
        directory.mkdir(mode=0o700)
        self.path = directory / "secret.sock"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.path))
        self.sock.listen(8)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted += 1
                body = self.ANSWER
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                conn.close()

    def close(self) -> None:
        self.sock.close()


async def test_a_link_in_place_of_the_servers_socket_leads_nowhere(boundary_hub: Hub):
    """Finding 5: the supervisor (root) connected to whatever ``run/server.sock`` pointed at:
    a link from there to a root-only socket made the user's route answer from it."""
    hub = boundary_hub
    target = RootOnlySocket(hub.root / f"root-only-{os.urandom(3).hex()}")
    try:
        await hub.spawn("oscar")
        oscar = await hub.user_token("oscar")
        swap = ("import os\nRUN = '/run/jupyter-sandbox'\n"
                "os.rename(RUN + '/server.sock', RUN + '/server.moved')\n"
                f"os.symlink({str(target.path)!r}, RUN + '/server.sock')\n")  # fmt: skip
        await hub.execute("oscar", oscar, detached(swap))
        run = Path((await hub.state("oscar"))["state_dir"]) / "run"
        await wait_for(lambda: (run / "server.sock").is_symlink(), 30, "the link is in place")
        response = await AsyncHTTPClient().fetch(HTTPRequest(
            f"{hub.url}/user/oscar/api/status", headers={"Authorization": f"token {oscar}"},
            request_timeout=30,
        ), raise_error=False)  # fmt: skip
        assert RootOnlySocket.ANSWER not in (response.body or b"")
        assert response.code != 200
        assert target.accepted == 0
    finally:
        target.close()


async def test_two_names_the_old_escaping_made_one_have_two_homes(boundary_hub: Hub):
    """Finding 4: "josé" and "jos-e9-" had one home; the second user's start took the
    first's files (and, as root, chowned them to itself)."""
    hub = boundary_hub
    await hub.spawn("josé")
    jose = await hub.user_token("josé")
    await hub.execute("josé", jose, "open('diary.txt', 'w').write('josé only')")
    (where,) = [p for p in (hub.root / "homes").iterdir() if (p / "diary.txt").exists()]
    owner = where.stat().st_uid
    await hub.spawn("jos-e9-")
    other = await hub.user_token("jos-e9-")
    seen = await hub.execute("jos-e9-", other, "import os; print(sorted(os.listdir('.')))")
    assert "diary.txt" not in seen
    assert where.stat().st_uid == owner  # not given to the other user
    assert (where / "diary.txt").read_text() == "josé only"
    assert where == home(hub, "josé") != home(hub, "jos-e9-")
    assert await hub.execute("josé", jose, "print(open('diary.txt').read())") == "josé only\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="homes have uids of their own only as root")
async def test_a_home_that_belongs_to_another_uid_is_refused_and_kept(boundary_hub: Hub):
    """A home kept from another account (or made by hand) is not "repaired" to whoever
    starts with that name: the start fails with what to do, and nothing changes."""
    hub = boundary_hub
    kept = home(hub, "peggy")
    kept.mkdir(parents=True)
    (kept / "theirs.txt").write_text("not peggy's")
    for path in (kept, kept / "theirs.txt"):
        os.chown(path, 4242, 4242)
    await hub.api("POST", "/users/peggy", raise_error=False)
    await hub.api("POST", "/users/peggy/server", raise_error=False)
    events = await hub.progress("peggy")
    assert events[-1].get("failed"), events
    assert "belongs to uid 4242" in events[-1]["message"]
    assert kept.stat().st_uid == (kept / "theirs.txt").stat().st_uid == 4242
    assert (kept / "theirs.txt").read_text() == "not peggy's"


@pytest.mark.parametrize("runtime", ["bubblewrap", "gvisor"])
async def test_two_hubs_on_one_machine_keep_to_their_own(runtime, tmp_path_factory):
    """Finding 8: user 2 of one Hub and user 2 of another shared cgroups (and gVisor
    container ids) and host uids: stopping one killed the other's server mid-cell. Each
    Hub's names and uids are its own, and a Hub given another's uids is refused."""
    from conftest import require_runtime

    require_runtime(runtime)
    hubs = [Hub(tmp_path_factory.mktemp(f"two-hubs-{x}-{runtime}"), runtime=runtime)
            for x in ("a", "b", "c")]  # fmt: skip
    a, b, c = hubs
    try:
        a.start()
        b.start()
        await a.spawn("uma")
        await b.spawn("uma")
        # One user id in both (the state directory is named by it).
        assert Path((await a.state("uma"))["state_dir"]).name == Path(
            (await b.state("uma"))["state_dir"]).name  # fmt: skip
        token = await b.user_token("uma")
        kernel = await b.run_detached("uma", token, "import time; time.sleep(120)")
        await a.api("DELETE", "/users/uma/server")
        await a.wait_stopped("uma")
        await asyncio.sleep(2)
        kernels = await b.server_api("uma", token, "GET", "/api/kernels")
        assert [k["execution_state"] for k in kernels if k["id"] == kernel] == ["busy"]
        assert (await b.execute("uma", token, "print('alive')")).strip() == "alive"
        if os.geteuid() == 0:
            assert home(a, "uma").stat().st_uid != home(b, "uma").stat().st_uid
            # A third Hub told to use the first one's uids is refused, with what to do.
            base = json.loads((a.root / "servers" / "hub.json").read_text())["uid_base"]
            c.config.write_text(c.config.read_text() +
                                f"c.LocalSandboxSpawner.uid_base = {base}\n")  # fmt: skip
            c.start()
            await c.api("POST", "/users/uma", raise_error=False)
            await c.api("POST", "/users/uma/server", raise_error=False)
            events = await c.progress("uma")
            assert events[-1].get("failed") and "overlap those of the Hub" in events[-1]["message"]
        # A fourth Hub configured with the first one's state root and homes is refused too.
        d = Hub(tmp_path_factory.mktemp(f"two-hubs-d-{runtime}"), runtime=runtime,
                extra_config=f"c.LocalSandboxSpawner.state_root = '{a.root}/servers'\n"
                             f"c.LocalSandboxSpawner.homes_root = '{a.root}/homes'\n")  # fmt: skip
        hubs.append(d)
        d.start()
        await d.api("POST", "/users/uma", raise_error=False)
        await d.api("POST", "/users/uma/server", raise_error=False)
        events = await d.progress("uma")
        assert events[-1].get("failed") and "another Hub is running with" in events[-1]["message"]
        assert home(a, "uma").is_dir()
    finally:
        for hub in hubs:
            hub.close()
            end_supervisors(hub.root)


async def test_a_state_root_too_long_for_a_socket_fails_at_once_saying_so(tmp_path_factory):
    """A server's sockets live under the state root: one too long for a Unix socket's path
    made every start wait out its whole timeout, saying nothing."""
    from conftest import require_runtime

    require_runtime("bubblewrap")
    root = tmp_path_factory.mktemp("long-state-root")
    deep = root / ("d" * 60) / ("e" * 60)
    hub = Hub(root, extra_config=f"c.LocalSandboxSpawner.state_root = {str(deep)!r}\n")
    try:
        hub.start()
        await hub.api("POST", "/users/rita", raise_error=False)
        started = time.monotonic()
        await hub.api("POST", "/users/rita/server", raise_error=False)
        events = await hub.progress("rita")
        assert events[-1].get("failed"), events
        assert "more than a Unix socket's path may be" in events[-1]["message"]
        assert "state_root" in events[-1]["message"]
        assert time.monotonic() - started < 30
    finally:
        hub.close()
        end_supervisors(root)


async def test_an_account_never_gets_a_uid_or_home_an_earlier_account_had(hub: Hub):
    """JupyterHub's database gives a deleted user's id to the next user (SQLite does): with
    uids made from ids, a new account had a deleted one's uid, and, taking its name, its
    home. Each account's uid is its own, never given again."""
    if os.geteuid() != 0:
        pytest.fail("the Hub's tests run as root (uids of their own)")
    await hub.spawn("carol2")
    carol = await hub.user_token("carol2")
    await hub.execute("carol2", carol, "open('diary.txt', 'w').write('carol only')")
    carol_uid = home(hub, "carol2").stat().st_uid
    await hub.api("DELETE", "/users/carol2")  # the newest user: its id is given again
    await hub.spawn("mallory2")
    assert home(hub, "mallory2").stat().st_uid != carol_uid
    await hub.api("DELETE", "/users/mallory2/server")
    await hub.wait_stopped("mallory2")
    await hub.api("DELETE", "/users/mallory2")
    # A new account of the deleted one's name finds its home kept, and refused to it.
    await hub.api("POST", "/users/carol2")
    await hub.api("POST", "/users/carol2/server", raise_error=False)
    events = await hub.progress("carol2")
    assert events[-1].get("failed") and "belongs to uid" in events[-1]["message"], events
    assert home(hub, "carol2").stat().st_uid == carol_uid
    assert (home(hub, "carol2") / "diary.txt").read_text() == "carol only"


async def test_a_servers_endless_log_does_not_hold_up_the_hub(hub: Hub):
    """A server that makes its log 3 GiB (sparse: nothing on disk) and fails: the Hub read
    all of it for the error message, on its event loop, and everyone's requests waited."""
    await hub.spawn("lola")
    lola = await hub.user_token("lola")
    await hub.execute("lola", lola, (
        "import os\nos.makedirs('.jupyter', exist_ok=True)\n"
        "open('.jupyter/jupyter_config.py', 'w').write("
        "'import os\\nos.ftruncate(1, 3 << 30)\\nos._exit(3)\\n')\n"))  # fmt: skip
    await hub.api("DELETE", "/users/lola/server")
    await hub.wait_stopped("lola")
    slowest, done = 0.0, False

    async def ping() -> None:
        nonlocal slowest
        while not done:
            began = time.monotonic()
            await hub.api("GET", "/")
            slowest = max(slowest, time.monotonic() - began)
            await asyncio.sleep(0.1)

    pinging = asyncio.ensure_future(ping())
    try:
        await hub.api("POST", "/users/lola/server", raise_error=False)
        events = await hub.progress("lola")
    finally:
        done = True
        await pinging
    assert events[-1].get("failed"), events
    assert slowest < 2, f"the Hub's API waited {slowest:.1f}s"
    (home(hub, "lola") / ".jupyter" / "jupyter_config.py").unlink()


async def test_what_a_user_leaves_in_place_of_the_hub_socket_does_not_break_the_stop(hub: Hub):
    """A directory where the Hub API's socket was: the supervisor failed at its stop and
    wrote no exit code."""
    await hub.spawn("nina")
    nina = await hub.user_token("nina")
    await hub.execute("nina", nina, (
        "import os\nRUN = '/run/jupyter-sandbox'\nos.unlink(RUN + '/hub.sock')\n"
        "os.mkdir(RUN + '/hub.sock')\n"))  # fmt: skip
    state = Path((await hub.state("nina"))["state_dir"])
    await hub.api("DELETE", "/users/nina/server")
    await hub.wait_stopped("nina")
    assert (state / "exit").exists()
    assert "Traceback" not in (state / "supervisor.log").read_text()


async def test_what_one_user_sends_as_options_stops_nobody_elses_hibernation(tmp_path_factory):
    """A user who started their own server with ``{"profile": []}`` made every sweep fail
    (one user's records were read outside the per-server guard): nobody hibernated. And a
    profile the spawner never checked (the local spawner has none) exempted its sender."""
    from conftest import require_runtime

    require_runtime("bubblewrap")
    root = tmp_path_factory.mktemp("hibernate-options")
    args = ("--interval=1", "--exempt-profiles=gpu")
    hub = Hub(root, hibernate_after=4, extra_config="".join(
        f"c.JupyterHub.services[0]['command'].append({a!r})\n" for a in args)).start()
    try:
        for name, profile in (("pat", []), ("quin", "gpu"), ("ruth", None)):
            await hub.api("POST", f"/users/{name}", raise_error=False)
            await hub.api("POST", f"/users/{name}/server", {"profile": profile})
            await hub.wait_ready(name)
        for name in ("ruth", "quin", "pat"):
            assert await hub.stops_within(name, 60), f"{name} hibernates"
    finally:
        hub.close()
        end_supervisors(root)
