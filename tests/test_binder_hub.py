"""Binder links on a real JupyterHub on one machine (LocalSandboxSpawner, bubblewrap): the
event stream from link to running server, the repository's package importable in the
launched notebook's kernel, the second launch of a commit cached, users' own copies,
anonymous launches and their removal, bad links, and the launch page in a real browser.

The repository is served by git's dumb HTTP protocol and the package by a PEP 503 index,
both from this machine's loopback (never the internet)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from binder_fixtures import (
    SERVICE,
    BinderHub,
    git_repo,
    launch,
    phases,
    server_of,
    server_stopped,
    spec,
    user_gone,
    user_token,
    wait_for,
)
from hub_fixtures import Hub, login
from tornado.httpclient import AsyncHTTPClient

from testcluster.cluster import free_port


@pytest.fixture(scope="module")
def binder_hub(tmp_path_factory) -> Iterator[Hub]:
    from conftest import require_runtime

    require_runtime("bubblewrap")
    setup = BinderHub(tmp_path_factory.mktemp("binder-hub"))
    setup.hub.repo_url = setup.repo_url  # type: ignore[attr-defined]
    setup.hub.repos = setup.repos  # type: ignore[attr-defined]
    yield setup.hub
    setup.close()


async def test_bad_links_fail_clearly_and_leave_nothing(binder_hub: Hub):
    hub = binder_hub
    token = await user_token(hub, "erin")
    users_before = {u["name"] for u in await hub.api("GET", "/users")}
    page = await AsyncHTTPClient().fetch(f"{hub.url}{SERVICE}/v2/zenodo/10.5281/x",
                                         raise_error=False)  # fmt: skip
    assert page.code == 400 and b"unknown provider" in page.body
    assert b'data-reason="unknown-provider"' in page.body
    url = hub.repo_url  # type: ignore[attr-defined]
    closed = f"http://127.0.0.1:{free_port()}/demo.git"
    cases = {
        "unresolvable-ref": ("git", spec(url, "no-such-branch")),
        "disallowed-host": ("git", spec("https://elsewhere.example/r.git")),
        "unreachable": ("git", spec(closed)),
        "malformed": ("gh", "only-an-org"),
        "unknown-provider": ("svn", "x/y/z"),
    }
    for reason, (provider, what) in cases.items():
        events = await launch(hub, provider, what, token)
        assert events[-1]["phase"] == "failed", events
        assert events[-1]["reason"] == reason, events[-1]
        assert events[-1]["message"]
    assert {u["name"] for u in await hub.api("GET", "/users")} == users_before
    assert not list((hub.root / "binder").glob("*/*/prepared.json"))  # nothing prepared


async def test_a_link_opens_running_with_its_packages(binder_hub: Hub):
    hub = binder_hub
    token = await user_token(hub, "alice")
    events = await launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
    assert phases(events) == ["waiting", "fetching", "building", "launching", "ready"], events
    log = "\n".join(e["message"] for e in events)
    assert "running postBuild" in log and "installing the repository's packages" in log
    ready = events[-1]
    user, server = server_of(ready)
    assert user == "alice" and server.startswith("b-demo-")
    assert ready["url"].endswith("/index.ipynb") and "token" not in ready
    # The notebook at urlpath, run in the launched server's sandbox.
    notebook = await hub.server_api(f"alice/{server}", token, "GET", "/api/contents/index.ipynb")
    code = notebook["content"]["cells"][0]["source"]
    out = await hub.execute(f"alice/{server}", token, code)
    assert "package says from the index" in out, out
    runs = await hub.server_api(f"alice/{server}", token, "GET",
                                "/api/contents/postbuild-runs.txt")  # fmt: skip
    assert runs["content"].split() == ["ran"]
    # It runs with no network of its own: the repository's code reaches no host port.
    out = await hub.execute(f"alice/{server}", token,
                            "import socket\ntry:\n socket.create_connection(('127.0.0.1', "
                            f"{hub.proxy_port}), timeout=3); print('connected')\n"
                            "except OSError as e: print('blocked', type(e).__name__)")  # fmt: skip
    assert "blocked" in out, out


async def test_second_launch_is_cached_and_keeps_the_users_changes(binder_hub: Hub):
    hub = binder_hub
    token = await user_token(hub, "alice")
    first = await launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
    _, server = server_of(first[-1])
    await hub.server_api(f"alice/{server}", token, "PUT", "/api/contents/my-notes.txt",
                         {"type": "file", "format": "text", "content": "mine"})  # fmt: skip
    await hub.api("DELETE", f"/users/alice/servers/{server}")
    await wait_for(lambda: server_stopped(hub, "alice", server))
    began = time.monotonic()
    events = await launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
    assert events[-1]["phase"] == "ready", events
    assert any(e.get("cached") for e in events), events
    log = "\n".join(e["message"] for e in events)
    assert "postBuild" not in log and "pip" not in log, log
    notes = await hub.server_api(f"alice/{server}", token, "GET", "/api/contents/my-notes.txt")
    assert notes["content"] == "mine"
    runs = await hub.server_api(f"alice/{server}", token, "GET",
                                "/api/contents/postbuild-runs.txt")  # fmt: skip
    assert runs["content"].split() == ["ran"]  # postBuild ran once, at preparation
    print(f"cached launch after hibernation: {time.monotonic() - began:.2f}s")
    # Another user shares the prepared commit, with a copy of their own.
    bob = await user_token(hub, "bob")
    events = await launch(hub, "git", spec(hub.repo_url), bob)  # type: ignore[attr-defined]
    assert events[-1]["phase"] == "ready" and any(e.get("cached") for e in events), events
    _, bob_server = server_of(events[-1])
    listing = await hub.server_api(f"bob/{bob_server}", bob, "GET", "/api/contents/")
    assert "my-notes.txt" not in {item["name"] for item in listing["content"]}


async def test_a_start_script_runs_before_the_server(binder_hub: Hub):
    """binder/start, as on mybinder.org: it runs first, the server is its ``exec "$@"``."""
    hub = binder_hub
    start = '#!/bin/bash\nexport DEMO_STARTED="by start, in $PWD"\nexec "$@"\n'
    git_repo(hub.repos, "starter", {"binder/start": start, "README.md": "hi\n"},  # type: ignore[attr-defined]
             executable=("binder/start",))  # fmt: skip
    url = hub.repo_url.replace("demo.git", "starter.git")  # type: ignore[attr-defined]
    token = await user_token(hub, "stella")
    events = await launch(hub, "git", spec(url), token, urlpath="")
    assert events[-1]["phase"] == "ready", events
    assert any("no packages" in e["message"] for e in events), events  # nothing to prepare
    _, server = server_of(events[-1])
    out = await hub.execute(f"stella/{server}", token,
                            "import os; print(os.environ.get('DEMO_STARTED'))")  # fmt: skip
    assert out.strip() == "by start, in /home/jovyan", out


async def test_anonymous_launch_gets_a_temporary_user_removed_after_idle(binder_hub: Hub):
    hub = binder_hub
    events = await launch(hub, "git", spec(hub.repo_url))  # type: ignore[attr-defined]
    ready = events[-1]
    assert ready["phase"] == "ready" and ready["token"], events
    user, _ = server_of(ready)
    assert user.startswith("binder-")
    response = await AsyncHTTPClient().fetch(
        f"{hub.url}{ready['url'].replace('index.ipynb', 'api/status')}", raise_error=False)
    assert response.code == 200, response.code  # the token in the URL opens the server
    home = hub.root / "homes" / user
    assert (home / "binder").is_dir()
    # Idle for the temporary users' timeout: the server stops and the user goes, home and all.
    assert await wait_for(lambda: user_gone(hub, user), timeout=90), user
    assert not home.exists()


async def test_the_launch_page_in_a_browser(binder_hub: Hub, browser):
    hub = binder_hub
    page = await browser.new_page()
    await login(page, hub, "carol")
    await page.wait_for_url(lambda url: "/hub/login" not in url, timeout=30_000)
    link = f"{hub.url}{SERVICE}/v2/git/{spec(hub.repo_url)}?urlpath=lab"  # type: ignore[attr-defined]
    await page.goto(link)
    # The page streams the launch, then goes to JupyterLab in carol's server for the repo.
    await page.wait_for_url("**/user/carol/b-demo-*/lab**", timeout=180_000)
    await page.wait_for_selector("#jp-main-dock-panel", timeout=60_000)
    # A bad link: an error page that says why.
    await page.goto(f"{hub.url}{SERVICE}/v2/git/{spec(hub.repo_url, 'nope')}")
    error = page.locator("#error")
    await error.wait_for(state="visible", timeout=60_000)
    assert "no branch, tag or ref 'nope'" in await error.inner_text()
    assert await error.get_attribute("data-reason") == "unresolvable-ref"
    # The form makes a link and its badge.
    await page.goto(f"{hub.url}{SERVICE}/binder")
    await page.select_option("#provider", "gh")
    await page.fill("#repo", "org/repo")
    await page.fill("#ref", "main")
    value = await page.input_value("#markdown")
    assert value == (f"[![Launch in a sandbox]({hub.url}{SERVICE}/badge.svg)]"
                     f"({hub.url}{SERVICE}/v2/gh/org/repo/main)")  # fmt: skip


async def stop_launched(hub: Hub) -> None:
    """Stop the servers earlier tests launched (the Hub allows 3 of one repository)."""
    for user in await hub.api("GET", "/users?state=active"):
        for name in user.get("servers") or {}:
            if name.startswith("b-demo-"):
                await hub.api("DELETE", f"/users/{user['name']}/servers/{name}")
                await wait_for(lambda u=user["name"], n=name: server_stopped(hub, u, n))


async def test_the_launch_page_is_binderhubs_kind_and_accessible(binder_hub: Hub, browser,
                                                                   tmp_path):  # fmt: skip
    """BinderHub's loading page, as research groups know it: the steps and a progress bar,
    the repository and ref, the log behind "Show logs", the link and badge to share, and a
    failure that says why, with a retry. Usable by keyboard and screen readers (roles and
    names), and on a phone's width. Screenshots of each state are kept with the test's
    files."""
    hub = binder_hub
    await stop_launched(hub)
    page = await browser.new_page(viewport={"width": 1200, "height": 900})
    await login(page, hub, "dana")
    await page.wait_for_url(lambda url: "/hub/login" not in url, timeout=30_000)
    link = f"{hub.url}{SERVICE}/v2/git/{spec(hub.repo_url)}?urlpath=lab"  # type: ignore[attr-defined]
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/build/" in r.url else None)
    await page.goto(link)
    await page.get_by_role("progressbar", name="Launch progress").wait_for(timeout=30_000)
    # The stream is the link's own path, escaped as it came (not decoded and re-read).
    assert streams and streams[0].split("?")[0] == link.split("?")[0].replace("/v2/", "/build/")
    await page.screenshot(path=str(tmp_path / "launching.png"))
    repo = page.locator("#repo")
    assert await repo.get_attribute("href") == hub.repo_url.removesuffix(".git")  # type: ignore[attr-defined]
    assert await page.get_by_role("list", name="Launch steps").locator("li").count() == 5
    assert await page.get_by_role("status").count() == 1
    assert await page.input_value("#share-link") == link  # no session token in it
    badge = await page.input_value("#share-badge")
    assert badge == f"[![Launch in a sandbox]({hub.url}{SERVICE}/badge.svg)]({link})"
    await page.wait_for_url("**/user/dana/b-demo-*/lab**", timeout=180_000)

    # A failure, on a phone's width: the reason, the logs opened, a retry to press.
    await page.set_viewport_size({"width": 375, "height": 740})
    await page.goto(f"{hub.url}{SERVICE}/v2/git/{spec(hub.repo_url, 'nope')}")  # type: ignore[attr-defined]
    alert = page.get_by_role("alert")
    await alert.wait_for(state="visible", timeout=60_000)
    assert "no branch, tag or ref 'nope'" in await alert.inner_text()
    assert await page.get_attribute("#error", "data-reason") == "unresolvable-ref"
    assert await page.get_attribute("#status", "data-phase") == "failed"
    assert await page.locator("#logs").get_attribute("open") is not None
    assert await page.evaluate("document.activeElement.id") == "retry"
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await page.screenshot(path=str(tmp_path / "failed-narrow.png"), full_page=True)
    # The retry starts the launch again (the page reloads and streams anew).
    await page.keyboard.press("Enter")
    await page.wait_for_load_state()
    await alert.wait_for(state="visible", timeout=60_000)
    # The logs open and close by keyboard alone.
    await page.locator("#logs summary").focus()
    await page.keyboard.press("Enter")
    assert await page.locator("#logs").get_attribute("open") is None
    await page.keyboard.press("Enter")
    assert await page.locator("#logs").get_attribute("open") is not None
    assert "nope" in await page.locator("#log").inner_text()
    for shot in ("launching.png", "failed-narrow.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot


def stream_answering(body: str):
    """A Playwright route handler that answers an event stream with ``body``."""

    async def answer(route) -> None:
        await route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                            body=body)  # fmt: skip

    return answer


async def test_a_launch_link_cannot_send_the_page_elsewhere(binder_hub: Hub, browser):
    """The attack review's links, in Chromium. The page's event stream was addressed by the
    link's decoded path: an escaped "/.." in a ref became a real one, so a link showing
    github.com's jupyter/notebook launched another repository, or sent the session's xsrf
    token to another user's server; a stream that answered with a javascript: address ran
    it; a backslash in a repository's URL pointed its link at another host than the one
    checked. Each is refused now, and nothing is requested elsewhere."""
    from urllib.parse import quote

    hub = binder_hub
    page = await browser.new_page()
    await login(page, hub, "hank")
    await page.wait_for_url(lambda url: "/hub/login" not in url, timeout=30_000)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    hidden = quote(quote(hub.repo_url, safe=""), safe="")  # type: ignore[attr-defined]
    port = hub.repo_url.split(":")[2].split("/")[0]  # type: ignore[attr-defined]
    for link, reason in [
        (f"gh/jupyter/notebook/{quote(f'x/../../../../git/{hidden}/main', safe='')}",
         "malformed"),
        (f"gh/jupyter/notebook/{quote('x/../../../../../../../user/mallory/c', safe='')}",
         "malformed"),
        (f"gh/jupyter/notebook/{quote('.hidden/x', safe='')}", "malformed"),
        (f"git/{spec(f'http://evil.example{chr(92)}@127.0.0.1:{port}/demo.git')}",
         "disallowed-host"),
        (f"git/{spec(f'http://someone:secret@127.0.0.1:{port}/demo.git')}", "disallowed-host"),
    ]:  # fmt: skip
        await page.goto(f"{hub.url}{SERVICE}/v2/{link}?urlpath=lab")
        assert await page.get_attribute("#error", "data-reason") == reason, link
    assert not [u for u in requests if "/build/" in u or "/user/" in u], requests

    # A stream that answers "ready" with an address off this Hub (a script, another site)
    # is not followed: the page says so.
    for target in ("javascript:alert(document.domain)", "https://elsewhere.example/"):
        await page.route("**/build/**", stream_answering(
            f'data: {{"phase": "ready", "url": "{target}"}}\n\n'))  # fmt: skip
        await page.goto(f"{hub.url}{SERVICE}/v2/git/{spec(hub.repo_url)}")  # type: ignore[attr-defined]
        await page.get_by_role("alert").wait_for(state="visible", timeout=30_000)
        assert await page.get_attribute("#error", "data-reason") == "bad-address"
        assert page.url.startswith(hub.url), page.url
        await page.unroute("**/build/**")
    assert dialogs == []


async def test_launch_limits_per_user_and_per_repository(binder_hub: Hub):
    """Abuse controls: launches in flight per user (2 here), servers of one repository
    across users (3 here); reopening one's own running server is never refused."""
    hub = binder_hub
    await stop_launched(hub)
    token = await user_token(hub, "lim-a")
    results = await asyncio.gather(*(launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
                                     for _ in range(3)))  # fmt: skip
    outcomes = sorted(r[-1].get("reason", r[-1]["phase"]) for r in results)
    assert outcomes == ["ready", "ready", "too-many-launches"], [r[-1] for r in results]

    async def running() -> int:
        users = await hub.api("GET", "/users?state=active")
        return sum(1 for u in users for name, server in (u.get("servers") or {}).items()
                   if name.startswith("b-demo-") and server.get("ready"))  # fmt: skip

    for i in range(3 - await running()):
        events = await launch(hub, "git", spec(hub.repo_url),  # type: ignore[attr-defined]
                              await user_token(hub, f"lim-{i}"))  # fmt: skip
        assert events[-1]["phase"] == "ready", events
    assert await running() == 3
    events = await launch(hub, "git", spec(hub.repo_url), await user_token(hub, "lim-x"))  # type: ignore[attr-defined]
    assert events[-1]["reason"] == "too-many-launches", events[-1]
    assert "lim-x" not in {u["name"] for u in await hub.api("GET", "/users?state=active")}
    events = await launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
    assert events[-1]["phase"] == "ready", events  # lim-a's own server, running


async def test_a_link_on_a_gvisor_hub(tmp_path_factory):
    """The default runtime as root: preparation and servers under gVisor; once the launched
    servers' template is built, a cached launch is restored from it, and imports the
    package."""
    from conftest import require_runtime
    from test_local_hub_gvisor import template_ready

    require_runtime("gvisor")
    setup = BinderHub(tmp_path_factory.mktemp("binder-gvisor-hub"), runtime="gvisor")
    hub = setup.hub
    probe = "import demo_pkg, os; print(demo_pkg.VALUE, os.uname().release)"
    try:
        for user in ("gina", "gus"):
            token = await user_token(hub, user)
            events = await launch(hub, "git", spec(setup.repo_url), token)
            assert events[-1]["phase"] == "ready", events
            assert any(e.get("cached") for e in events) == (user == "gus"), events
            restored = any("restored from a template" in e["message"] for e in events)
            assert restored == (user == "gus"), events
            _, server = server_of(events[-1])
            out = await hub.execute(f"{user}/{server}", token, probe)
            assert out.split() == ["from", "the", "index", "4.4.0"], out  # gVisor's kernel
            if user == "gina":  # built in the background after the first launched server
                await template_ready(hub)
    finally:
        setup.close()
