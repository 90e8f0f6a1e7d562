"""The review's attacks on Binder links (issue 23) through a real JupyterHub (its proxy, its
service, LocalSandboxSpawner, bubblewrap): what a repository or a user's own server can do
to the root processes that prepare and launch, looked for on the host.

* a preparation that makes its environment's ``.site`` a link to the Hub's cookie secret;
* a user whose running server plants links in their home, where the Hub makes their copy
  of a repository as root (``~/binder`` a link; a directory swapped for a link mid-copy);
* a launch that copies a large repository while the Hub must go on answering;
* anonymous launches: a global cap and a rate per client, behind the proxy;
* an ``environment.yml`` of nested YAML aliases, against the service and the Hub.

Two Hubs on one machine collide (cgroup names, uids): run this module alone, e.g. under
``flock /tmp/jupyter-sandbox-hub-tests.lock``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from binder_fixtures import (
    SERVICE,
    BinderHub,
    alias_bomb,
    git_repo,
    launch,
    peak_rss,
    server_of,
    server_stopped,
    spec,
    user_token,
    wait_for,
)
from hub_fixtures import Hub, processes_of_module
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from sandbox_spawner.binder.prepare import repo_key


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[BinderHub]:
    from conftest import require_runtime

    require_runtime("bubblewrap")
    hub = BinderHub(tmp_path_factory.mktemp("binder-untrusted"))
    yield hub
    hub.close()


def repo_url(setup: BinderHub, name: str) -> str:
    return setup.repo_url.replace("demo.git", f"{name}.git")


def root_only_dir(path: Path) -> Path:
    """A directory like /root: root's, mode 0700, with a file of root's."""
    path.mkdir(mode=0o700)
    (path / "shadow").write_text("root's\n")
    (path / "shadow").chmod(0o600)
    return path


def host_uid(hub: Hub, user: str) -> int:
    return (hub.root / "homes" / user).stat().st_uid


# -- 1. the environment's .site --------------------------------------------------------------
async def test_a_site_link_puts_no_secret_of_the_hub_into_a_server(setup: BinderHub):
    hub = setup.hub
    cookie = hub.root / "jupyterhub_cookie_secret"
    secret = cookie.read_text().strip()
    assert secret and oct(cookie.stat().st_mode & 0o777) == "0o600"
    git_repo(setup.repos, "sitelink", {
        "requirements.txt": "demo_pkg\n",
        "postBuild": f"#!/bin/sh\nln -sf {cookie} /srv/binder/.site\n",
    }, executable=("postBuild",))  # fmt: skip
    token = await user_token(hub, "sid")
    events = await launch(hub, "git", spec(repo_url(setup, "sitelink")), token, urlpath="")
    if events[-1]["phase"] == "ready":
        _, server = server_of(events[-1])
        out = await hub.execute(f"sid/{server}", token,
                                "import os; print(os.environ['PYTHONPATH'])")  # fmt: skip
        leaked = " (the Hub's cookie secret)" if secret in out else ""
        pytest.fail(f"launched; its server's PYTHONPATH is {out.strip()!r}{leaked}")
    assert events[-1]["reason"] == "preparation-failed", events[-1]
    assert ".site" in events[-1]["message"], events[-1]
    assert not any(secret in e["message"] for e in events)


# -- 2. links in the user's home ---------------------------------------------------------------
async def test_a_link_made_by_the_users_server_does_not_redirect_the_hubs_copy(setup: BinderHub):
    """From their running server the user makes ~/binder a link to a root-only directory
    of the host, then launches: the Hub (root) made the copy there, owned by the user."""
    hub = setup.hub
    victim = root_only_dir(hub.root / "root-only")
    await hub.spawn("mallory")
    token = await user_token(hub, "mallory")
    out = await hub.execute("mallory", token,
                            f"import os; os.symlink({str(victim)!r}, '/home/jovyan/binder'); "
                            "print('planted')")  # fmt: skip
    assert "planted" in out, out
    events = await launch(hub, "git", spec(setup.repo_url), token)
    assert sorted(os.listdir(victim)) == ["shadow"], (
        f"the Hub wrote into {victim}: "
        f"{[(n, os.lstat(victim / n).st_uid) for n in os.listdir(victim)]}, mallory is "
        f"{host_uid(hub, 'mallory')}")
    assert events[-1]["phase"] == "failed", events[-1]
    assert "binder" in events[-1]["message"] and "link" in events[-1]["message"], events[-1]
    # The link was the user's doing: without it, the launch works.
    await hub.execute("mallory", token, "import os; os.unlink('/home/jovyan/binder')")
    events = await launch(hub, "git", spec(setup.repo_url), token)
    assert events[-1]["phase"] == "ready", events[-1]
    await hub.api("DELETE", "/users/mallory/server")


#: Run in the user's own server while the Hub copies: as soon as the copy's staging directory
#: is the user's to change, its directories become links to a root-only directory.
SWAPPER = """
import os, time
binder, victim = "/home/jovyan/binder", {victim!r}
os.makedirs(binder, exist_ok=True)
swapped, deadline = 0, time.time() + 240
while not swapped and time.time() < deadline:
    for name in os.listdir(binder):
        if not name.startswith("."):
            continue
        staging = os.path.join(binder, name)
        for i in range(40):
            d = f"{{staging}}/d{{i}}"
            try:
                os.rename(d, d + ".moved")
                os.symlink(victim, d)
                swapped += 1
            except OSError:
                pass
open("/home/jovyan/swapped.txt", "w").write(str(swapped))
"""
#: 40 directories of 500 files, each with a file named as one of the root-only directory.
MANY_DIRS = """#!/bin/sh
for i in $(seq 0 39); do mkdir d$i; (cd d$i && seq 1 500 | xargs touch && echo x > shadow); done
"""


async def test_a_directory_swapped_for_a_link_mid_copy_leads_nowhere(setup: BinderHub):
    """While the Hub (root) copied into a staging directory of the user's home, the user's
    server (which may change what root owns in its home: its sandbox holds CAP_DAC_OVERRIDE
    over the home's root-owned files) swapped its directories for links to a root-only
    directory: root's copy went on through them, writing the repository's files there and
    giving it their mode."""
    hub = setup.hub
    victim = root_only_dir(hub.root / "root-only-2")
    git_repo(setup.repos, "many", {"requirements.txt": "demo_pkg\n", "postBuild": MANY_DIRS},
             executable=("postBuild",))  # fmt: skip
    await hub.spawn("mallet")
    token = await user_token(hub, "mallet")
    await hub.run_detached("mallet", token, SWAPPER.format(victim=str(victim)))
    events = await launch(hub, "git", spec(repo_url(setup, "many")), token, urlpath="")
    home = hub.root / "homes" / "mallet"
    assert await wait_for(lambda: _exists(home / "swapped.txt"), timeout=240)
    swapped = (home / "swapped.txt").read_text()
    found = {n: (oct(os.lstat(victim / n).st_mode), os.lstat(victim / n).st_uid)
             for n in sorted(os.listdir(victim))}  # fmt: skip
    mode = oct(victim.stat().st_mode & 0o777)
    assert (found, mode) == ({"shadow": ("0o100600", 0)}, "0o700"), (
        f"after {swapped} directories were swapped for links, {victim} is mode {mode} and "
        f"holds {len(found)} entries: {dict(list(found.items())[:4])}...")  # fmt: skip
    # Whatever the user did to their own copy, the launch says what happened.
    assert events[-1]["phase"] in ("ready", "failed") and events[-1]["message"], events[-1]
    print(f"{swapped} directories swapped; the launch: {events[-1]['phase']}, "
          f"{events[-1]['message']}")  # fmt: skip
    await hub.api("DELETE", "/users/mallet/server")


async def _exists(path: Path) -> bool:
    return path.exists()


# -- 3. a large repository, copied while the Hub answers -------------------------------------
LARGE = """#!/bin/sh
head -c 700000000 /dev/urandom > data.bin
truncate -s 2G sparse.bin
"""


async def test_the_hub_answers_while_a_launch_copies_a_large_repository(setup: BinderHub):
    """700 MB of data and a 2 GiB sparse file: the copy into each user's home ran in the
    Hub's event loop (and wrote the holes out); the Hub's API answered nobody meanwhile."""
    hub = setup.hub
    git_repo(setup.repos, "large", {"requirements.txt": "demo_pkg\n", "postBuild": LARGE},
             executable=("postBuild",))  # fmt: skip
    url = repo_url(setup, "large")
    try:
        for user in ("lara", "lars"):  # the first prepares (in the service), both copy
            token = await user_token(hub, user)
            events, slowest = await while_measuring(hub, launch(hub, "git", spec(url), token,
                                                                urlpath=""))  # fmt: skip
            assert events[-1]["phase"] == "ready", events[-1]
            print(f"{user}'s launch: the Hub's API answered within {slowest:.3f}s")
            assert slowest < 1.0, f"the Hub's API took {slowest:.2f}s to answer ({user}'s launch)"
            copy = hub.root / "homes" / user / "binder" / repo_key(url)
            assert (copy / "data.bin").stat().st_size == 700_000_000
            sparse = (copy / "sparse.bin").stat()
            assert sparse.st_size == 2 << 30 and sparse.st_blocks * 512 < 1 << 20, sparse
            _, server = server_of(events[-1])
            await hub.api("DELETE", f"/users/{user}/servers/{server}")
            await wait_for(lambda u=user, s=server: server_stopped(hub, u, s))
    finally:  # gigabytes: not left for pytest's temporary directories to keep
        for user in ("lara", "lars"):
            shutil.rmtree(hub.root / "homes" / user / "binder", ignore_errors=True)
        for entry in (hub.root / "binder").glob("*large*"):
            shutil.rmtree(entry, ignore_errors=True)


async def while_measuring(hub: Hub, work) -> tuple[object, float]:
    """``work``'s result, and the slowest answer of the Hub's API (GET /hub/api, asked every
    0.1 s) meanwhile."""
    slowest = 0.0
    task = asyncio.ensure_future(work)
    client = AsyncHTTPClient(force_instance=True)
    try:
        while not task.done():
            began = time.monotonic()
            await client.fetch(HTTPRequest(f"{hub.url}/hub/api", request_timeout=120))
            slowest = max(slowest, time.monotonic() - began)
            await asyncio.sleep(0.1)
        return await task, slowest
    finally:
        client.close()
        if not task.done():
            task.cancel()


def service_pid(hub: Hub) -> int:
    """The Hub's sandbox-service (a process of the Hub's, with the Hub's cache)."""
    found = processes_of_module("sandbox_spawner.service", f"--binder-cache={hub.root}")
    assert found, "the service's process is not found"
    return found[0]


# -- 3b. YAML aliases --------------------------------------------------------------------------
async def launch_page(hub: Hub, what: str, token: str) -> tuple[list[dict], int]:
    """A launch's events as a browser gets them, however large, and the bytes it got."""
    chunks: list[bytes] = []
    client = AsyncHTTPClient(force_instance=True, max_body_size=1 << 30)
    try:
        response = await client.fetch(HTTPRequest(
            f"{hub.url}{SERVICE}/build/git/{what}", headers={"Authorization": f"token {token}"},
            streaming_callback=chunks.append, request_timeout=300), raise_error=False)  # fmt: skip
    finally:
        client.close()
    assert response.code == 200, response.code
    body = b"".join(chunks)
    events = [json.loads(line[5:]) for block in body.split(b"\n\n")
              for line in block.split(b"\n") if line.startswith(b"data:")]  # fmt: skip
    return events, len(body)


async def test_an_alias_bomb_blows_up_neither_the_service_nor_the_hub(setup: BinderHub):
    """420 bytes of environment.yml, nested aliases: the service expanded them (~140 MiB)
    into the launch page's messages and prepared.json (88 to 883 MiB of memory, its pages
    stalled 6.4 s), and the Hub, starting the server, read that record whole on its event
    loop (6.5 s). Refused at once now, saying why, and nothing is kept."""
    hub = setup.hub
    git_repo(setup.repos, "aliasbomb", {"environment.yml": alias_bomb(), "README.md": "hi\n"})
    url = repo_url(setup, "aliasbomb")
    service = service_pid(hub)
    before = peak_rss(service, reset=True)
    token = await user_token(hub, "bomber")
    (events, sent), slowest = await while_measuring(hub, launch_page(hub, spec(url), token))
    grew = peak_rss(service) - before
    records = [p.stat().st_size for p in (hub.root / "binder").glob(f"{repo_key(url)}/*/*.json")]
    last = {k: str(v)[:300] for k, v in events[-1].items()}
    evidence = (f"{last}; the service's memory +{grew >> 20} MiB, the Hub's API answered "
                f"within {slowest:.1f}s, the launch page got {sent >> 10} KiB, records "
                f"{records}")  # fmt: skip
    print(evidence)
    try:
        assert last["phase"] == "failed" and "alias" in last["message"], evidence
        assert grew < 64 << 20 and slowest < 1.0 and sent < 16 << 10, evidence
        assert records == [], evidence
    finally:
        if events[-1]["phase"] == "ready":
            _, server = server_of(events[-1])
            await hub.api("DELETE", f"/users/bomber/servers/{server}")
            await wait_for(lambda: server_stopped(hub, "bomber", server))
        for entry in (hub.root / "binder").glob(f"{repo_key(url)}*"):
            shutil.rmtree(entry, ignore_errors=True)


# -- 4a. anonymous launches ------------------------------------------------------------------
async def test_anonymous_launches_have_a_global_cap_and_a_rate_per_client(tmp_path_factory):
    """Behind the proxy every visitor is one address to the service; the proxy appends the
    visitor's own to X-Forwarded-For, and only that part of the header is believed."""
    from conftest import require_runtime

    require_runtime("bubblewrap")
    # (A long idle timeout: no temporary user goes away during the test.)
    limits = ("--binder-anonymous-limit=3", "--binder-client-launches=2",
              "--binder-client-window=600", "--binder-anonymous-timeout=600")  # fmt: skip
    anon = BinderHub(tmp_path_factory.mktemp("anon"), args=limits)  # (short: socket paths)
    hub = anon.hub
    git_repo(anon.repos, "other", {"README.md": "hi\n"})
    try:
        one = [await launch(hub, "git", spec(anon.repo_url), source="127.0.0.2", urlpath="")
               for _ in range(2)]  # fmt: skip
        assert [e[-1]["phase"] for e in one] == ["ready", "ready"], [e[-1] for e in one]
        third = await launch(hub, "git", spec(anon.repo_url), source="127.0.0.2", urlpath="")
        assert third[-1].get("reason") == "too-many-launches", third[-1]
        assert "address" in third[-1]["message"], third[-1]
        spoofed = await launch(hub, "git", spec(anon.repo_url), source="127.0.0.2", urlpath="",
                               headers={"X-Forwarded-For": "203.0.113.9"})  # fmt: skip
        assert spoofed[-1].get("reason") == "too-many-launches", spoofed[-1]
        other = await launch(hub, "git", spec(anon.repo_url), source="127.0.0.3", urlpath="")
        assert other[-1]["phase"] == "ready", other[-1]  # another visitor, 3 temporary users
        capped = await launch(hub, "git", spec(repo_url(anon, "other")), source="127.0.0.4",
                              urlpath="")  # fmt: skip
        assert capped[-1].get("reason") == "too-many-launches", capped[-1]
        assert "temporary users" in capped[-1]["message"], capped[-1]
        users = [u["name"] for u in await hub.api("GET", "/users")]
        assert len([u for u in users if u.startswith("binder-")]) == 3, users
    finally:
        anon.close()
