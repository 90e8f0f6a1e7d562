"""SandboxSpawner: a real JupyterHub and proxy, users' servers in Sandboxes on the test cluster.

The stand-in node agent runs each pod's ``jupyterhub-singleuser`` (bubblewrap, or
gVisor for the shipped default profile); this project's controller makes the pods
from the Sandboxes. Users are made and their servers started through the Hub API and
reached through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import time

from cluster_fixtures import Client, condition, wait_for
from hub_fixtures import Hub

from agent_sandbox.kube import PODS, PVCS, SANDBOXES, TEMPLATES

PLAIN = {"profile": "plain"}


def home_dir(node_agent, hub: Hub, user: str):
    return node_agent.root / "pvc" / hub.namespace / f"home-jupyter-{user}"


async def test_spawn_write_hibernate_resume(kube_hub: Hub, k8s: Client, node_agent):
    hub, ns = kube_hub, kube_hub.namespace
    await hub.spawn("alice", options=PLAIN)
    sandbox = k8s.get(SANDBOXES, ns, "jupyter-alice")
    assert condition(sandbox, "Ready")["status"] == "True"
    # The home is a claim template of the Sandbox: the controller made and owns the PVC.
    pvc = k8s.get(PVCS, ns, "home-jupyter-alice")
    assert pvc["metadata"]["ownerReferences"][0]["name"] == "jupyter-alice"
    token = await hub.user_token("alice")
    assert "started" in await hub.server_api("alice", token, "GET", "/api/status")
    write = "import os; open('kept.txt', 'w').write('x'); print(os.getcwd())"
    out = await hub.execute("alice", token, write)
    assert out.strip() == "/home/jovyan"
    assert (home_dir(node_agent, hub, "alice") / "kept.txt").exists()
    assert (await hub.state("alice"))["pod_name"] == "jupyter-alice"

    # Hibernate: the pod goes, the Sandbox (Suspended) and the PVC stay.
    await hub.api("DELETE", "/users/alice/server")
    await hub.wait_stopped("alice")
    sandbox = k8s.get(SANDBOXES, ns, "jupyter-alice")
    assert sandbox["spec"]["operatingMode"] == "Suspended"
    assert condition(sandbox, "Suspended")["status"] == "True"
    assert k8s.get(PODS, ns, "jupyter-alice") is None
    assert k8s.get(PVCS, ns, "home-jupyter-alice") is not None

    # Resume: the same Sandbox runs again, the file is there.
    started = time.monotonic()
    await hub.spawn("alice", options=PLAIN)
    print(f"resumed in {time.monotonic() - started:.2f}s")
    assert k8s.get(SANDBOXES, ns, "jupyter-alice")["metadata"]["uid"] == sandbox["metadata"]["uid"]
    out = await hub.execute("alice", token, "print(open('kept.txt').read())")
    assert out.strip() == "x"


async def test_default_profile_is_gvisor_and_progress_shows_the_sandbox(kube_hub: Hub,
                                                                       k8s: Client):  # fmt: skip
    hub = kube_hub
    await hub.api("POST", "/users/bea", raise_error=False)
    await hub.api("POST", "/users/bea/server")  # no options: the shipped default profile
    events = await hub.progress("bea")
    messages = [e.get("message", "") for e in events]
    assert any("Creating Sandbox" in m for m in messages), messages
    assert len([m for m in messages if "Sandbox" in m or "pod" in m]) >= 2, messages
    assert events[-1].get("ready") is True, events
    assert k8s.get(PODS, hub.namespace, "jupyter-bea")["spec"]["runtimeClassName"] == "gvisor"
    token = await hub.user_token("bea")
    assert (await hub.execute("bea", token, "print(6 * 7)")).strip() == "42"


async def test_a_spawn_that_cannot_succeed_fails_fast_with_the_reason(kube_hub: Hub,
                                                                      k8s: Client):  # fmt: skip
    hub = kube_hub
    # A runtime class the cluster does not have: the API server refuses the pod.
    await hub.api("POST", "/users/cid", raise_error=False)
    started = time.monotonic()
    await hub.api("POST", "/users/cid/server", {"profile": "missing-runtime"})
    events = await hub.progress("cid")
    took = time.monotonic() - started
    assert events[-1].get("failed") is True, events
    text = json.dumps(events[-1])
    assert "RuntimeClass" in text and "no-such-runtime" in text, text
    assert took < 30, f"failed after {took:.1f}s"


async def test_an_image_that_cannot_be_pulled_and_a_pod_no_node_fits_fail_fast(
    kube_hub: Hub,
):
    """KubeSpawner #795: these used to wait out start_timeout. The shipped GPU profile asks
    for nvidia.com/gpu, which the test cluster's one node does not have."""
    hub = kube_hub
    for user, profile, expected in (("dee", "bad-image", "the image cannot be pulled"),
                                    ("ed", "gpu", "Insufficient nvidia.com/gpu")):  # fmt: skip
        await hub.api("POST", f"/users/{user}", raise_error=False)
        started = time.monotonic()
        await hub.api("POST", f"/users/{user}/server", {"profile": profile})
        events = await hub.progress(user)
        took = time.monotonic() - started
        assert events[-1].get("failed") is True, events
        assert expected in json.dumps(events[-1]), events[-1]
        assert took < 30, f"{profile}: failed after {took:.1f}s"


async def test_a_missing_sandbox_template_fails_fast(kube_hub: Hub):
    hub = kube_hub
    await hub.api("POST", "/users/cy", raise_error=False)
    await hub.api("POST", "/users/cy/server", {"profile": "missing-template"})
    events = await hub.progress("cy")
    assert events[-1].get("failed") is True, events
    assert "SandboxTemplate" in json.dumps(events[-1]) and "does not exist" in json.dumps(
        events[-1]
    )


async def test_a_sandbox_template_is_the_base_of_the_server(kube_hub: Hub, k8s: Client):
    """An administrator's SandboxTemplate (its container's environment here) with the
    server joined to it."""
    hub, ns = kube_hub, kube_hub.namespace
    container = {"name": "notebook", "image": "course/image:2026",
                 "env": [{"name": "COURSE", "value": "physics-101"}]}  # fmt: skip
    spec = {"podTemplate": {"spec": {"containers": [container]}}}
    k8s.create(TEMPLATES, ns, {"metadata": {"name": "course-base"}, "spec": spec})
    await hub.spawn("cat", options={"profile": "templated"})
    pod = k8s.get(PODS, ns, "jupyter-cat")
    assert pod["spec"]["containers"][0]["image"] == "course/image:2026"
    token = await hub.user_token("cat")
    out = await hub.execute("cat", token, "import os; print(os.environ['COURSE'], os.getcwd())")
    assert out.split() == ["physics-101", "/home/jovyan"]


async def test_a_hub_restart_finds_running_and_hibernated_servers(kube_hub: Hub, k8s: Client):
    hub, ns = kube_hub, kube_hub.namespace
    await hub.spawn("dan", options=PLAIN)
    await hub.spawn("eve", options=PLAIN)
    await hub.api("DELETE", "/users/eve/server")
    await hub.wait_stopped("eve")
    pod_uid = k8s.get(PODS, ns, "jupyter-dan")["metadata"]["uid"]
    hub.stop()
    hub.start()
    await hub.wait_ready("dan", timeout=60)
    await asyncio.sleep(2)  # the Hub's first poll of every server has run
    assert k8s.get(PODS, ns, "jupyter-dan")["metadata"]["uid"] == pod_uid  # undisturbed
    dan = await hub.user_token("dan")
    assert "started" in await hub.server_api("dan", dan, "GET", "/api/status")
    eve = await hub.api("GET", "/users/eve")
    assert not eve["servers"]
    assert k8s.get(SANDBOXES, ns, "jupyter-eve")["spec"]["operatingMode"] == "Suspended"
    assert k8s.get(PODS, ns, "jupyter-eve") is None


async def test_deleting_a_user_removes_their_sandbox_and_home_only(kube_hub: Hub, k8s: Client):
    hub, ns = kube_hub, kube_hub.namespace
    await hub.spawn("fay", options=PLAIN)
    await hub.spawn("gus", options=PLAIN)
    await hub.api("DELETE", "/users/fay/server")
    await hub.wait_stopped("fay")
    await hub.api("DELETE", "/users/fay")
    wait_for(lambda: k8s.get(SANDBOXES, ns, "jupyter-fay") is None, 30, "fay's Sandbox gone")
    wait_for(lambda: k8s.get(PVCS, ns, "home-jupyter-fay") is None, 60, "fay's PVC gone")
    assert k8s.get(SANDBOXES, ns, "jupyter-gus") is not None
    assert k8s.get(PVCS, ns, "home-jupyter-gus") is not None
    gus = await hub.user_token("gus")
    assert "started" in await hub.server_api("gus", gus, "GET", "/api/status")

