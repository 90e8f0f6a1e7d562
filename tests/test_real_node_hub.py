"""The Hub on Kubernetes with its users' servers as gVisor pods on the real node.

Node: the real one (testcluster/realnode.py), for what the stand-in cannot show: the
shipped configuration's default profile as a gVisor pod, its home a PersistentVolume
that the kubelet mounts and gives to the pod's group, the server reaching the Hub and
the Hub's proxy reaching the server over the pod network, and the home surviving
hibernation (pod deleted, Sandbox Suspended, volume kept and mounted again). The
stand-in's suites (test_kube_hub.py, test_kube_hibernation.py) cover the rest faster.

The cluster has no storage provisioner: as on a bare-metal cluster, the homes are
local PersistentVolumes an administrator made (here the test), bound by the
controller manager to the claims the Sandboxes make.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixtures import Client, condition, wait_for
from hub_fixtures import Hub, real_node_hub_config, start_kube_hub
from test_kube_hibernation import busy_kernel_keeps_its_sandbox

from agent_sandbox.kube import PODS, PVCS, SANDBOXES, Resource

PVS = Resource("", "v1", "persistentvolumes", "PersistentVolume")


@pytest.fixture(scope="module")
def real_hub(tmp_path_factory, real, real_k8s) -> Iterator[Hub]:
    """A Hub with the shipped Kubernetes configuration on the real node's cluster, its
    service hibernating servers after 6 quiet seconds."""
    real.node.local_volumes(real.cluster, "home", 6)
    config = real_node_hub_config(real.node)
    hub = start_kube_hub(tmp_path_factory, real.cluster, hibernate_after=6, extra_config=config)
    yield hub
    hub.close()
    real.cluster.request("DELETE", f"/api/v1/namespaces/{hub.namespace}")  # type: ignore[attr-defined]


def volume_of(k8s: Client, ns: str, claim: str) -> Path:
    pvc = wait_for(lambda: (k8s.get(PVCS, ns, claim) or {}).get("spec", {}).get("volumeName")
                   and k8s.get(PVCS, ns, claim), 30, "the claim bound")  # fmt: skip
    return Path(k8s.get(PVS, None, pvc["spec"]["volumeName"])["spec"]["local"]["path"])


async def test_a_gvisor_server_whose_home_survives_hibernation(real_hub: Hub, real_k8s: Client):
    hub, k8s, ns = real_hub, real_k8s, real_hub.namespace
    await hub.spawn("ada")  # the shipped default profile: gVisor
    pod = k8s.get(PODS, ns, "jupyter-ada")
    assert pod["spec"]["runtimeClassName"] == "gvisor" and pod["spec"]["nodeName"] == "real-node"
    assert pod["status"]["podIP"].startswith("10.244.")
    ada = await hub.user_token("ada")
    code = ("import os, platform; print(platform.release(), os.getuid(), os.getcwd()); "
            "open('notes.txt', 'w').write('kept')")
    facts = await hub.execute("ada", ada, code)
    assert facts.split() == ["4.4.0", "1000", "/home/jovyan"]
    # The home is the bound volume, given to the pod's group by the kubelet.
    home = volume_of(k8s, ns, "home-jupyter-ada")
    assert (home / "notes.txt").read_text() == "kept"
    assert os.stat(home).st_gid == pod["spec"]["securityContext"]["fsGroup"]

    assert await hub.stops_within("ada", 90), "an idle server hibernates"
    sandbox = k8s.get(SANDBOXES, ns, "jupyter-ada")
    assert sandbox["spec"]["operatingMode"] == "Suspended"
    wait_for(lambda: k8s.get(PODS, ns, "jupyter-ada") is None, 60, "the pod gone")
    wait_for(lambda: condition(k8s.get(SANDBOXES, ns, "jupyter-ada"), "Suspended")
             .get("status") == "True", 30, "Suspended")  # fmt: skip
    assert volume_of(k8s, ns, "home-jupyter-ada") == home

    await hub.api("POST", "/users/ada/server")
    await hub.wait_ready("ada", timeout=180)
    assert k8s.get(SANDBOXES, ns, "jupyter-ada")["metadata"]["uid"] == sandbox["metadata"]["uid"]
    assert k8s.get(PODS, ns, "jupyter-ada")["metadata"]["uid"] != pod["metadata"]["uid"]
    out = await hub.execute("ada", ada, "print(open('notes.txt').read())")
    assert out.strip() == "kept"


async def test_a_two_core_node_holds_more_servers_than_cores(real_hub: Hub, real_k8s: Client):
    """The scheduler packs servers by what they request: the shipped guarantees, not
    their limits (a pod without requests reserves its limits: one server per core)."""
    users = ["di", "ed", "flo"]
    await asyncio.gather(*(real_hub.spawn(user) for user in users))
    for user in users:
        pod = real_k8s.get(PODS, real_hub.namespace, f"jupyter-{user}")
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "100m"
    for user in users:
        await real_hub.api("DELETE", f"/users/{user}/server")


async def test_a_busy_kernel_keeps_its_gvisor_server(real_hub: Hub, real_k8s: Client):
    await busy_kernel_keeps_its_sandbox(real_hub, real_k8s, "bo", None, busy=20)
