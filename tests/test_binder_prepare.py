"""A repository's environment prepared in a sandbox, behind an enforced egress allowlist,
and cached by commit: real git (dumb HTTP) and a real package index on loopback, real
pip, real bubblewrap and gVisor sandboxes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess

import pytest
from binder_fixtures import events, git_repo, link, pod_preparer, preparer
from conftest import require_runtime

from sandbox_spawner.binder.egress import Allowlist
from sandbox_spawner.binder.prepare import PreparationFailed

#: postBuild: the package is importable; it tries the outside both ways (directly, and
#: through the proxy), and records what it is and what happened, in the repository.
POST_BUILD = """#!/usr/bin/env python3
import os, socket, urllib.request
import demo_pkg
results = ["value=" + demo_pkg.VALUE, "uid=%d" % os.getuid()]
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5)
    results.append("direct=connected")
except OSError as exc:
    results.append("direct=" + type(exc).__name__)
try:
    urllib.request.urlopen("http://127.0.0.1:{port}/", timeout=10)
    results.append("proxied=fetched")
except Exception as exc:
    results.append("proxied=" + str(getattr(exc, "code", type(exc).__name__)))
results.append("shadow=" + str(os.path.exists("/etc/shadow")))
open("postbuild-ran.txt", "w").write("\\n".join(results) + "\\n")
print("postBuild done")
"""


class Listener:
    """A TCP port on the host's loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0)
        self.port = self.sock.getsockname()[1]

    def accepted(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.mark.parametrize("runtime", ["bubblewrap", "gvisor"])
async def test_prepared_in_a_sandbox_behind_the_allowlist_and_cached(served, tmp_path, runtime):
    require_runtime(runtime)
    outside = Listener()
    name = f"prep-{runtime}"
    commit = git_repo(served["repos"], name, {
        "binder/requirements.txt": "demo_pkg==1.0\n",
        "binder/postBuild": POST_BUILD.format(port=outside.port),
        "notebook.ipynb": "{}",
    }, executable=("binder/postBuild",))  # fmt: skip
    prep = preparer(served, tmp_path, runtime)
    seen, emit = events()
    prepared, cached = await prep.prepare(link(served, name), commit, emit)
    log = "\n".join(m for _, m in seen)
    assert not cached, log
    results = (prepared.repo / "postbuild-ran.txt").read_text().splitlines()
    assert "value=from the index" in results, results
    assert "direct=ConnectionRefusedError" in results, results  # no network of its own
    assert "proxied=403" in results, results  # the proxy refuses what is not allowed
    assert "shadow=False" in results
    assert "uid=0" not in results, results
    assert outside.accepted() == 0  # nothing reached the host port, by any way
    assert f"127.0.0.1:{outside.port}" in log and "Refused by the egress allowlist" in log
    site = prepared.env / prepared.record["site"]
    assert (site / "demo_pkg.py").is_file(), sorted(p.name for p in site.parent.rglob("*"))
    assert prepared.record["commit"] == commit and prepared.record["post_build"]
    assert {p for p, _ in seen} >= {"fetching", "building"}
    # Shared and read-only from here: the second launch of the commit prepares nothing.
    seen2, emit2 = events()
    again, cached = await prep.prepare(link(served, name), commit, emit2)
    assert cached and again.path == prepared.path
    assert not any("postBuild" in m or "pip" in m for _, m in seen2), seen2
    assert os.listdir(tmp_path / "cache" / ".work") == []
    assert oct((prepared.path).stat().st_mode & 0o777) == oct(0o755)


async def test_concurrent_launches_of_a_commit_prepare_it_once(served, tmp_path):
    require_runtime("bubblewrap")
    commit = git_repo(served["repos"], "concurrent", {"requirements.txt": "demo_pkg\n"})
    prep = preparer(served, tmp_path, "bubblewrap")
    (seen1, emit1), (seen2, emit2) = events(), events()
    (one, cached1), (two, cached2) = await asyncio.gather(
        prep.prepare(link(served, "concurrent"), commit, emit1),
        prep.prepare(link(served, "concurrent"), commit, emit2),
    )
    assert one.path == two.path
    assert sorted([cached1, cached2]) == [False, True]
    waited = seen2 if cached2 else seen1
    assert any(phase == "waiting" for phase, _ in waited), waited


@pytest.mark.parametrize(
    ("files", "limits", "says"),
    [
        ({"requirements.txt": "no_such_package_here\n"}, {}, "exit code"),
        ({"postBuild": "#!/bin/sh\nsleep 60\n"}, {"timeout": 3}, "longer than 3s"),
        ({"postBuild": "#!/bin/sh\nhead -c 80000000 /dev/zero > big\nsleep 30\n"},
         {"disk_bytes": 20 << 20}, "MiB of disk"),
        ({"binder/requirements.txt": "x\n", ".binder/requirements.txt": "y\n"}, {},
         "both binder/ and .binder/"),
    ],
    ids=["missing-package", "time-limit", "disk-limit", "two-config-dirs"],
)  # fmt: skip
async def test_a_failed_preparation_says_why_and_leaves_nothing(served, tmp_path, files, limits,
                                                                 says):  # fmt: skip
    require_runtime("bubblewrap")
    name = f"failing-{abs(hash(tuple(files))) % 10**8}"
    executable = tuple(p for p in files if p.endswith("postBuild"))
    commit = git_repo(served["repos"], name, files, executable=executable)
    prep = preparer(served, tmp_path, "bubblewrap", **limits)
    _, emit = events()
    with pytest.raises(PreparationFailed, match=says):
        await prep.prepare(link(served, name), commit, emit)
    assert prep.cached(link(served, name), commit) is None
    assert os.listdir(tmp_path / "cache" / ".work") == []
    leftover = subprocess.run(["pgrep", "-f", "sandbox_spawner.binder.inside"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    assert leftover == []


def test_allowlist_entries():
    allow = Allowlist(("pypi.org", "*.pythonhosted.org", "127.0.0.1:8080", "[::1]:9"))
    assert allow.allows("pypi.org", 443) and allow.allows("PyPI.org.", 80)
    assert not allow.allows("pypi.org", 22)  # a host without a port: web ports only
    assert allow.allows("files.pythonhosted.org", 443)
    assert not allow.allows("evilpypi.org", 443)
    assert allow.allows("127.0.0.1", 8080) and not allow.allows("127.0.0.1", 8081)


@pytest.mark.parametrize(
    "options",
    [
        {"repo": "../../etc", "commit": "0" * 40},
        {"repo": "a/b", "commit": "0" * 40},
        {"repo": ".work", "commit": "0" * 40},
        {"repo": "ok-key", "commit": "HEAD"},
        {"repo": "ok-key", "commit": "../" * 13 + "x"},
        {"repo": "ok-key", "commit": "0" * 40},  # well formed, never prepared
        "not a mapping",
    ],
)  # fmt: skip
def test_a_server_takes_only_a_prepared_commit_named_by_key(tmp_path, options):
    """user_options come from the user: they name a prepared commit of the cache, never a
    path of the host."""
    from sandbox_spawner.binder.server import BadBinderOptions, from_user_options

    (tmp_path / "etc").mkdir()
    with pytest.raises(BadBinderOptions):
        from_user_options({"binder": options}, tmp_path / "cache")
    assert from_user_options({}, tmp_path / "cache") is None


async def test_the_cache_keeps_its_bound_least_recently_launched_first(served, tmp_path):
    import fcntl

    from sandbox_spawner.binder import cache
    from sandbox_spawner.binder.prepare import PREPARED
    from sandbox_spawner.binder.seal import disk_usage

    prep = preparer(served, tmp_path, "bubblewrap")  # nothing to install: no sandbox runs
    prepared = []
    for i in range(3):
        commit = git_repo(served["repos"], f"evict{i}", {"data.txt": f"{i}" * 50_000})
        prepared.append((await prep.prepare(link(served, f"evict{i}"), commit, events()[1]))[0])
    for age, entry in enumerate(prepared):
        os.utime(entry.path / PREPARED, (1000 + age, 1000 + age))
    cache.touch(prepared[0])  # launched again just now: the most recent
    total = sum(disk_usage(p.path) for p in prepared)
    assert cache.evict(prep.cache_root, total - 1, keep=set()) == [prepared[1].path]
    assert not prepared[1].path.exists() and prepared[0].path.exists() and prepared[2].path.exists()
    # What a server uses stays, over the bound or not; so does what a launch holds.
    assert cache.evict(prep.cache_root, 0, keep={prepared[0].path, prepared[2].path}) == []
    lock = os.open(prepared[2].path.parent / f"{prepared[2].path.name}.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert cache.evict(prep.cache_root, 0, keep={prepared[0].path}) == []
    finally:
        os.close(lock)
    assert cache.evict(prep.cache_root, 0, keep={prepared[0].path}) == [prepared[2].path]
    assert [p.name for p in (tmp_path / "cache" / ".work").iterdir()] == []
    users = [{"name": "u", "servers": {"s": {"ready": True, "user_options": {"binder": {
        "repo": prepared[0].path.parent.name, "commit": prepared[0].path.name}}}}}]
    assert cache.in_use(users, prep.cache_root) == {prepared[0].path}


# -- on Kubernetes: a preparation pod --------------------------------------------------------
POD_POST_BUILD = """#!/usr/bin/env python3
import os, urllib.request
import demo_pkg
results = ["value=" + demo_pkg.VALUE]
try:
    urllib.request.urlopen("http://127.0.0.1:{port}/", timeout=10)
    results.append("proxied=fetched")
except Exception as exc:
    results.append("proxied=" + str(getattr(exc, "code", type(exc).__name__)))
forged = os.environ["http_proxy"].replace("binder:", "binder:x")  # another token: none
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{"http": forged}}))
try:
    opener.open("http://127.0.0.1:{port}/", timeout=10)
    results.append("forged=fetched")
except Exception as exc:
    results.append("forged=" + str(getattr(exc, "code", type(exc).__name__)))
open("postbuild-ran.txt", "w").write("\\n".join(results) + "\\n")
"""


def test_the_preparation_pod_is_locked_down():
    from sandbox_spawner.binder.kube_prepare import preparation_pod

    pod = preparation_pod("p", image="img", claim="cache", work=".work/x", runtime_class="gvisor",
                          uid=1000, memory_bytes=2 << 30, cpus=1.0, deadline=600,
                          command=["python3", "-m", "m"])  # fmt: skip
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["runtimeClassName"] == "gvisor" and spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] and spec["activeDeadlineSeconds"] == 600
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    assert container["resources"]["limits"] == {"memory": str(2 << 30), "cpu": "1000m",
                                                "ephemeral-storage": "1Gi"}  # fmt: skip
    mounts = {m["mountPath"]: (m["subPath"], m["readOnly"]) for m in container["volumeMounts"]}
    assert mounts == {"/home/jovyan": (".work/x/repo", False),
                      "/srv/binder": (".work/x/env", False),
                      "/run/jupyter-sandbox-build": (".work/x/plan", True),
                      "/var/log/binder": (".work/x/log", False)}  # fmt: skip


async def test_a_preparation_pod_on_the_cluster(served, cluster, node_agent, tmp_path):
    """The pod (on the test cluster's stand-in node: bubblewrap, host network, no network
    policy enforcement, so only the proxy's refusals can be tried here) prepares the commit
    on the cache volume, reaching out only through the service's proxy with its token."""
    await prepare_in_a_pod(served, cluster)


async def prepare_in_a_pod(served, cluster, node=None) -> None:
    """A preparation pod (on ``node``, else the stand-in) prepares a commit on the cache
    volume, reaching out only through the service's proxy with its token."""
    from agent_sandbox.kube import PODS

    outside = Listener()
    async with pod_preparer(served, cluster, node) as (prep, kube, namespace, cache_root):
        commit = git_repo(served["repos"], "in-a-pod", {
            "requirements.txt": "demo_pkg\n", "postBuild": POD_POST_BUILD.format(port=outside.port),
        }, executable=("postBuild",))  # fmt: skip
        seen, emit = events()
        try:
            prepared, cached = await prep.prepare(link(served, "in-a-pod"), commit, emit)
        except Exception as exc:  # the preparation's log says why
            raise AssertionError("\n".join(m for _, m in seen)) from exc
        log = "\n".join(m for _, m in seen)
        assert not cached and "Preparing in the pod binder-prepare-" in log, log
        results = (prepared.repo / "postbuild-ran.txt").read_text().splitlines()
        assert results == ["value=from the index", "proxied=403", "forged=407"], results
        assert outside.accepted() == 0
        assert f"Refused by the egress allowlist: 127.0.0.1:{outside.port}" in log
        assert (prepared.env / prepared.record["site"] / "demo_pkg.py").is_file()
        assert await kube.list(PODS, namespace) == []  # the pod is gone
        assert os.listdir(cache_root / ".work") == []
