"""Hibernation on Kubernetes: the Hub's own service (controller and hibernator in one
process) suspends idle users' Sandboxes, keeps busy ones, and a visit resumes them.

A real Hub and proxy with the shipped Kubernetes configuration, its service's
timeout shortened to 4 seconds, on the test cluster.
"""

from __future__ import annotations

import asyncio

from cluster_fixtures import Client, condition, wait_for
from hub_fixtures import Hub
from tornado.httpclient import AsyncHTTPClient

from agent_sandbox.kube import PODS, PVCS, SANDBOXES

PLAIN = {"profile": "plain"}


async def test_an_idle_server_hibernates_and_a_visit_resumes_it(
    hibernating_kube_hub: Hub, k8s: Client, node_agent
):
    hub, ns = hibernating_kube_hub, hibernating_kube_hub.namespace
    await hub.spawn("ivy", options=PLAIN)
    ivy = await hub.user_token("ivy")
    await hub.execute("ivy", ivy, "open('notes.txt', 'w').write('before the nap')")
    assert await hub.stops_within("ivy", 60), "an idle server hibernates"
    sandbox = k8s.get(SANDBOXES, ns, "jupyter-ivy")
    assert sandbox["spec"]["operatingMode"] == "Suspended"
    wait_for(lambda: condition(k8s.get(SANDBOXES, ns, "jupyter-ivy"), "Suspended")
             .get("status") == "True", 30, "Suspended")  # fmt: skip
    assert k8s.get(PODS, ns, "jupyter-ivy") is None  # no pod, no process
    assert k8s.get(PVCS, ns, "home-jupyter-ivy") is not None  # the home is kept
    home = node_agent.root / "pvc" / ns / "home-jupyter-ivy"
    assert (home / "notes.txt").read_text() == "before the nap"
    # Resumed, as the next visit does (implicit_spawn_seconds; the browser test shows it).
    await hub.api("POST", "/users/ivy/server", PLAIN)
    await hub.wait_ready("ivy", timeout=120)
    client = AsyncHTTPClient()
    assert k8s.get(SANDBOXES, ns, "jupyter-ivy")["metadata"]["uid"] == sandbox["metadata"]["uid"]
    out = await hub.execute("ivy", ivy, "print(open('notes.txt').read())")
    assert out.strip() == "before the nap"
    # The service counted it, and the resume, on /metrics.
    metrics = ""
    for _ in range(20):
        response = await client.fetch(f"http://127.0.0.1:{hub.service_port}/metrics")
        metrics = response.body.decode()
        if 'jupyter_sandbox_start_seconds_count{kind="resume"} 1.0' in metrics:
            break
        await asyncio.sleep(0.5)
    assert 'jupyter_sandbox_start_seconds_count{kind="resume"} 1.0' in metrics, metrics[-3000:]
    assert "jupyter_sandbox_hibernations_total 1.0" in metrics


async def test_a_busy_kernel_without_a_browser_keeps_its_sandbox(
    hibernating_kube_hub: Hub, k8s: Client
):
    await busy_kernel_keeps_its_sandbox(hibernating_kube_hub, k8s, "jon", PLAIN, busy=14)


async def busy_kernel_keeps_its_sandbox(hub: Hub, k8s: Client, user: str,
                                        options: dict | None, busy: int) -> None:  # fmt: skip
    """``user``'s server, busy for ``busy`` seconds with no browser, is not hibernated
    before its work ends, and is once it is quiet (the hub's timeout is shorter)."""
    await hub.spawn(user, options=options)
    token = await hub.user_token(user)
    await hub.run_detached(user, token, f"import time\nfor _ in range({busy}): time.sleep(1)")
    assert not await hub.stops_within(user, busy - 4), "a busy kernel keeps its server"
    sandbox = f"jupyter-{user}"
    assert k8s.get(SANDBOXES, hub.namespace, sandbox)["spec"]["operatingMode"] == "Running"
    # Once the computation is over and the server quiet, it hibernates.
    assert await hub.stops_within(user, 90)
    assert k8s.get(SANDBOXES, hub.namespace, sandbox)["spec"]["operatingMode"] == "Suspended"
