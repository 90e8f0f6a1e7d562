"""The review's attacks on Binder links (issue 23) through a real JupyterHub (its proxy, its
service, LocalSandboxSpawner, bubblewrap): what a repository or a user's own server can do
to the root processes that prepare and launch, looked for on the host.

* a preparation that makes its environment's ``.site`` a link to the Hub's cookie secret.

Two Hubs on one machine collide (cgroup names, uids): run this module alone, e.g. under
``flock /tmp/jupyter-sandbox-hub-tests.lock``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from binder_fixtures import BinderHub, git_repo, launch, server_of, spec, user_token
from hub_fixtures import Hub


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
