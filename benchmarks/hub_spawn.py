"""Hub spawn and resume: LocalSandboxSpawner beside JupyterHub's own LocalProcessSpawner.

    .venv/bin/python benchmarks/hub_spawn.py --local [--users 10] [--runtime gvisor]
    .venv/bin/python benchmarks/hub_spawn.py --kubernetes [--users 10] [--real-node]

--real-node: both Hubs' servers are gVisor pods on the real node (kubelet, containerd;
testcluster/realnode.py, root), KubeSpawner's with the same RuntimeClass.

Two Hubs run side by side on this machine, each with its real proxy, from the
shipped configuration: one with LocalSandboxSpawner, one with JupyterHub's
SimpleLocalProcessSpawner (the anchor: a plain, unsandboxed server per user, as
LocalProcessSpawner starts it, without needing a system account per user).
Users are spawned round-robin between the two, so machine noise hits both
alike. Measured per user, from the API call to the server answering through the
proxy (``GET /user/<name>/api/status`` with the user's token): the first spawn,
then, after every server was stopped (hibernated), the resume. Also printed:
the memory an idle user server holds (PSS and RSS of its processes) and what a
hibernated user holds (its processes: none). Medians, p95 and ratios to the
anchor's spawn. With ``--local``, also freezing: every sandboxed server frozen (as the
hibernator freezes an idle one), the memory it holds frozen, and the time from a request
through the proxy to its answer, thaw included, beside the same request to the anchor's
running server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the Hub harness the tests use

from hub_fixtures import (  # noqa: E402
    KUBE_HUB_CONFIG,
    Hub,
    end_supervisors,
    processes_of,
    real_node_hub_config,
)
from memory import memory_bytes  # noqa: E402
from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402

from sandbox_provisioner.runtimes.process import descendants  # noqa: E402
from sandbox_spawner import freezing  # noqa: E402

SANDBOX, ANCHOR = "sandbox", "local-process"
ANCHOR_CONFIG = """
c.JupyterHub.spawner_class = "simple"
c.JupyterHub.cleanup_servers = True  # the shipped config keeps servers across Hub restarts
c.Spawner.args = ["--allow-root"]
c.SimpleLocalProcessSpawner.home_dir_template = "{root}/local-homes/{{username}}"
"""


async def answers(hub: Hub, name: str, token: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    request = HTTPRequest(f"{hub.url}/user/{name}/api/status",
                          headers={"Authorization": f"token {token}"}, request_timeout=10,
                          follow_redirects=False)  # fmt: skip
    while time.monotonic() < deadline:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if response.code == 200:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{name}'s server did not answer through the proxy")


async def request_time(hub: Hub, name: str, token: str) -> float:
    """One request through the proxy to ``name``'s running server, to its answer."""
    request = HTTPRequest(f"{hub.url}/user/{name}/api/status",
                          headers={"Authorization": f"token {token}"}, request_timeout=30,
                          follow_redirects=False)  # fmt: skip
    started = time.perf_counter()
    response = await AsyncHTTPClient().fetch(request)
    assert response.code == 200, response.code
    return time.perf_counter() - started


async def freeze_all(hub: Hub, users: int) -> None:
    """Freeze every server of ``hub`` through its supervisor, as the hibernator does."""
    for i in range(users):
        state = await hub.state(f"u{i}")
        answer = await freezing.request(state["freezer"], {"do": "freeze", "quiet": 0})
        assert answer.get("ok"), answer


async def start_and_time(hub: Hub, name: str, token: str, options: dict | None = None) -> float:
    started = time.perf_counter()
    await hub.api("POST", f"/users/{name}/server", options, raise_error=False)
    await answers(hub, name, token)
    return time.perf_counter() - started


async def server_pids(hub: Hub, mode: str, name: str) -> list[int]:
    state = await hub.state(name)
    root = state.get("supervisor_pid") if mode == SANDBOX else state.get("pid")
    return [root, *descendants(root)] if root else []


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def bench(root: Path, users: int, runtime: str) -> int:
    for mode in (SANDBOX, ANCHOR):
        (root / mode).mkdir(parents=True)
    hubs = {
        SANDBOX: Hub(root / SANDBOX, runtime=runtime).start(),
        ANCHOR: Hub(root / ANCHOR, extra_config=ANCHOR_CONFIG.format(root=root / ANCHOR)).start(),
    }
    try:
        tokens: dict[tuple[str, str], str] = {}
        for i in range(users):
            for mode, hub in hubs.items():
                name = f"u{i}"
                await hub.api("POST", f"/users/{name}", raise_error=False)
                tokens[mode, name] = await hub.user_token(name)
        spawn: dict[str, list[float]] = {m: [] for m in hubs}
        resume: dict[str, list[float]] = {m: [] for m in hubs}
        for i in range(users):  # first spawns, round-robin
            for mode, hub in hubs.items():
                spawn[mode].append(await start_and_time(hub, f"u{i}", tokens[mode, f"u{i}"]))
        await asyncio.sleep(3)  # let the servers settle before measuring memory
        memory = {m: [memory_bytes(await server_pids(h, m, f"u{i}")) for i in range(users)]
                  for m, h in hubs.items()}  # fmt: skip
        warm: list[float] = []
        thaw: list[float] = []
        await freeze_all(hubs[SANDBOX], users)
        await asyncio.sleep(1)
        frozen = [memory_bytes(await server_pids(hubs[SANDBOX], SANDBOX, f"u{i}"))
                  for i in range(users)]  # fmt: skip
        for i in range(users):  # a request to a frozen server, beside one to a running one
            warm.append(await request_time(hubs[ANCHOR], f"u{i}", tokens[ANCHOR, f"u{i}"]))
            thaw.append(await request_time(hubs[SANDBOX], f"u{i}", tokens[SANDBOX, f"u{i}"]))
        uid = (hubs[SANDBOX].root / "homes" / "u0").stat().st_uid
        for i in range(users):  # hibernate everyone
            for hub in hubs.values():
                await hub.api("DELETE", f"/users/u{i}/server")
        for hub in hubs.values():
            for i in range(users):
                await hub.wait_stopped(f"u{i}", timeout=120)
        left = processes_of(uid)
        for i in range(users):  # resume, round-robin
            for mode, hub in hubs.items():
                resume[mode].append(await start_and_time(hub, f"u{i}", tokens[mode, f"u{i}"]))
    finally:
        for hub in hubs.values():
            hub.close()
        end_supervisors(root / SANDBOX)
    anchor = statistics.median(spawn[ANCHOR])
    print(f"hub spawn -> server answers through the proxy, {users} users per spawner, "
          f"sandboxes: {runtime} (seconds)")
    print(f"{'':28}{'p50':>8}{'p95':>8}{'ratio':>8}")
    for label, values in (("LocalProcessSpawner spawn", spawn[ANCHOR]),
                          ("LocalProcessSpawner restart", resume[ANCHOR]),
                          ("LocalSandboxSpawner spawn", spawn[SANDBOX]),
                          ("LocalSandboxSpawner resume", resume[SANDBOX])):  # fmt: skip
        p50, p95 = summary(values)
        print(f"{label:28}{p50:8.3f}{p95:8.3f}{p50 / anchor:7.2f}x")
    for mode, label in ((ANCHOR, "LocalProcessSpawner"), (SANDBOX, "LocalSandboxSpawner")):
        rss = statistics.median(r for r, _ in memory[mode])
        pss = statistics.median(p for _, p in memory[mode])
        print(f"idle server memory, {label}: {pss / 2**20:.0f} MiB (median PSS of its "
              f"processes; RSS summed over them {rss / 2**20:.0f} MiB)")  # fmt: skip
    print(f"a hibernated sandboxed user holds {len(left)} processes")
    warm50, warm95 = summary(warm)
    thaw50, thaw95 = summary(thaw)
    print(f"request -> answer through the proxy (seconds){'p50':>10}{'p95':>8}")
    print(f"{'LocalProcessSpawner, running':46}{warm50:8.4f}{warm95:8.4f}")
    print(f"{'LocalSandboxSpawner, frozen (thaw included)':46}{thaw50:8.4f}{thaw95:8.4f}"
          f"   {thaw50 / warm50:.2f}x the running anchor's, {thaw50 / anchor:.4f}x its spawn")
    pss = statistics.median(p for _, p in frozen)
    print(f"a frozen sandboxed server holds {pss / 2**20:.0f} MiB (median PSS; its processes "
          "use no CPU)")
    return 0


#: Plain KubeSpawner with the same configuration as SandboxSpawner (KubeSpawner is its base
#: class, so its traits are the same), without the service.
KUBE_ANCHOR_CONFIG = """
c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
for key, value in list(c.SandboxSpawner.items()):
    setattr(c.KubeSpawner, key, value)
c.KubeSpawner.profile_list = []
c.JupyterHub.services = [s for s in c.JupyterHub.services if s["name"] != "sandbox-service"]
c.JupyterHub.load_roles = [r for r in c.JupyterHub.load_roles if r["name"] != "sandbox-service"]
"""
#: On the real node, KubeSpawner's pods take the RuntimeClass of SandboxSpawner's default.
KUBE_REAL_NODE_ANCHOR = """
c.SandboxSpawner.extra_pod_config = {"runtimeClassName": "gvisor"}
"""


async def bench_kubernetes(root: Path, users: int, real_node: bool) -> int:
    """SandboxSpawner (its Hub's service runs the controller) beside plain KubeSpawner, on
    the test cluster, both with pods of the same kind: on the stand-in node the "plain"
    profile (no runtime class, bubblewrap), on the real node the shipped default (gVisor)
    and KubeSpawner with the same RuntimeClass."""
    with contextlib.ExitStack() as stack:
        cluster, node = _cluster(stack, root, real_node)
        return await _bench_kubernetes(root, users, cluster, node)


def _cluster(stack: contextlib.ExitStack, root: Path, real_node: bool):
    """The test cluster with the stand-in node agent, or a real node and its cluster."""
    from cluster_fixtures import Process

    from agent_sandbox import crds
    from testcluster import realnode
    from testcluster.cluster import TestCluster, kube_binaries

    if real_node:
        return (*stack.enter_context(realnode.running(root / "real", kube_binaries(),
                                                      crds=crds.all_crds())),)  # fmt: skip
    cluster = TestCluster(root / "cluster", kube_binaries())
    (root / "cluster").mkdir()
    cluster.start(crds=crds.all_crds())
    stack.callback(cluster.stop)
    agent = Process("node-agent", [sys.executable, "-m", "testcluster.node_agent", "--kubeconfig",
                                   str(cluster.kubeconfig), "--root", str(root / "node")],
                    root / "cluster").start()  # fmt: skip
    stack.callback(agent.stop)
    return cluster, None


async def _bench_kubernetes(root: Path, users: int, cluster, node) -> int:
    from agent_sandbox.kube import PODS, PVCS, SANDBOXES

    extra = ""
    if node is not None:  # homes on local volumes; the node's image; gVisor for both
        node.local_volumes(cluster, "home", 2 * users)
        extra = real_node_hub_config(node) + KUBE_REAL_NODE_ANCHOR
    hubs: dict[str, Hub] = {}
    try:
        for mode in (SANDBOX, ANCHOR):
            ns = f"bench-{mode}"
            cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
            (root / mode).mkdir()
            hubs[mode] = Hub(root / mode, config=KUBE_HUB_CONFIG,
                             extra_config=extra + (KUBE_ANCHOR_CONFIG if mode == ANCHOR else ""),
                             env={"KUBECONFIG": str(cluster.kubeconfig), "POD_NAMESPACE": ns,
                                  "JUPYTER_SANDBOX_LEASE_NAMESPACE": "default"})  # fmt: skip
            hubs[mode].start()
        options = {SANDBOX: None if node else {"profile": "plain"}, ANCHOR: None}
        tokens, spawn, resume = {}, {m: [] for m in hubs}, {m: [] for m in hubs}
        for i in range(users):
            for mode, hub in hubs.items():
                await hub.api("POST", f"/users/u{i}", raise_error=False)
                tokens[mode, i] = await hub.user_token(f"u{i}")
        for phase in (spawn, resume):
            for i in range(users):  # round-robin
                for mode, hub in hubs.items():
                    phase[mode].append(await start_and_time(hub, f"u{i}", tokens[mode, i],
                                                            options[mode]))  # fmt: skip
            if phase is resume:
                break
            for i in range(users):  # stop (hibernate) everyone
                for hub in hubs.values():
                    await hub.api("DELETE", f"/users/u{i}/server")
            for hub in hubs.values():
                for i in range(users):
                    await hub.wait_stopped(f"u{i}", timeout=120)
            held = {kind.plural: len(cluster.request("GET", kind.path("bench-sandbox"))[1]
                                     ["items"]) for kind in (PODS, SANDBOXES, PVCS)}  # fmt: skip
    finally:
        for hub in hubs.values():
            hub.close()
    anchor = statistics.median(spawn[ANCHOR])
    where = "the real node, gVisor pods" if node else "the stand-in node"
    print(f"hub spawn -> server answers through the proxy, {users} users per spawner, "
          f"on {where} (seconds)")
    print(f"{'':28}{'p50':>8}{'p95':>8}{'ratio':>8}")
    for label, values in (("KubeSpawner spawn", spawn[ANCHOR]),
                          ("KubeSpawner restart", resume[ANCHOR]),
                          ("SandboxSpawner spawn", spawn[SANDBOX]),
                          ("SandboxSpawner resume", resume[SANDBOX])):  # fmt: skip
        p50, p95 = summary(values)
        print(f"{label:28}{p50:8.3f}{p95:8.3f}{p50 / anchor:7.2f}x")
    print(f"{users} hibernated users hold: {held['pods']} pods, {held['sandboxes']} Sandboxes, "
          f"{held['persistentvolumeclaims']} PVCs")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true",
                       help="the Hub on one machine (LocalSandboxSpawner)")  # fmt: skip
    where.add_argument("--kubernetes", action="store_true",
                       help="SandboxSpawner beside KubeSpawner on the test cluster")  # fmt: skip
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--runtime", default="bubblewrap", help="bubblewrap, gvisor or auto")
    parser.add_argument("--real-node", action="store_true",
                        help="with --kubernetes: pods on the real node")  # fmt: skip
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        # BENCH_DIR=DIR keeps the Hubs' and the cluster's logs there (an empty directory).
        tmp = os.environ.get("BENCH_DIR") or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-hub-"))  # fmt: skip
        Path(tmp).chmod(0o755)
        if args.kubernetes:
            return asyncio.run(bench_kubernetes(Path(tmp), args.users, args.real_node))
        return asyncio.run(bench(Path(tmp), args.users, args.runtime))


if __name__ == "__main__":
    sys.exit(main())
