"""The per-kernel profile of the shipped Kubernetes Hub configuration, end to end.

A user's trusted server (profile "kernels") runs with the service account
``jupyter-sandbox-kernels`` of the shipped RBAC, whose token the stand-in node
mounts as a kubelet does, and the deployment's controller key from the Secret
the configuration names. Each kernel it starts with the cluster kernelspec is
a Sandbox claimed from the shipped gVisor warm pool, labelled with the user,
and gone when the server stops.
"""

from __future__ import annotations

import base64

import pytest
from cluster_fixtures import Client, wait_for
from hub_fixtures import Hub, start_kube_hub
from test_kubernetes_kernels import REPLICAS, ready_members, shipped_manifests

from agent_sandbox import api
from agent_sandbox.kube import CLAIMS, PODS, SANDBOXES, SECRETS, TEMPLATES, WARM_POOLS
from sandbox_provisioner.agent.protocol import load_or_create_signing_key, public_key_text
from sandbox_provisioner.runtimes.kubernetes import hub_server_id, server_selector
from testcluster.cluster import REPO

KERNELS = {"profile": "kernels"}
KERNELSPEC = "sandboxed-python-cluster-gvisor"
#: The "image" of the test's servers has the cluster kernelspecs installed.
EXTRA_CONFIG = f"""
for profile in c.SandboxSpawner.profile_list:
    if profile["slug"] == "kernels":
        profile["kubespawner_override"]["environment"]["JUPYTER_PATH"] = (
            "{REPO / "jupyter_config" / "kubernetes"}")
"""


@pytest.fixture(scope="module")
def kernels_hub(tmp_path_factory, cluster, node_agent):
    hub = start_kernels_hub(tmp_path_factory, cluster, EXTRA_CONFIG)
    yield hub
    hub.close()
    cluster.request("DELETE", f"/api/v1/namespaces/{hub.namespace}")  # type: ignore[attr-defined]


def start_kernels_hub(tmp_path_factory, cluster, extra_config: str, **container_fields) -> Hub:
    """A Hub, and in its namespace what the profile needs, made as its documentation says:
    the shipped RBAC (applied with the Hub), the controller key's Secret, the shipped pool
    with its public key (``container_fields`` set on its kernels' container)."""
    hub = start_kube_hub(tmp_path_factory, cluster, extra_config=extra_config)
    ns = hub.namespace  # type: ignore[attr-defined]
    try:
        k8s = Client(cluster)  # the shipped RBAC is applied with the Hub's
        key_file = tmp_path_factory.mktemp("key") / "controller-ed25519.pem"
        public = public_key_text(load_or_create_signing_key(str(key_file)))
        data = {"controller-ed25519.pem": base64.b64encode(key_file.read_bytes()).decode()}
        k8s.create(SECRETS, ns, {"metadata": {"name": "jupyter-sandbox-controller-key"},
                                 "data": data})  # fmt: skip
        template, pool = shipped_manifests(public, **container_fields)
        k8s.create(TEMPLATES, ns, {k: template[k] for k in ("metadata", "spec")})
        k8s.create(WARM_POOLS, ns, {k: pool[k] for k in ("metadata", "spec")})
        wait_for(lambda: len(ready_members(k8s, ns)) == REPLICAS, 180, "a warm pool")
    except BaseException:
        hub.close()  # no fixture will: it never got the Hub
        raise
    return hub


def live_claims(k8s: Client, ns: str, selector: str) -> list[dict]:
    """Claims matching ``selector`` that are not being deleted."""
    return [c for c in k8s.list(CLAIMS, ns, selector) if not c["metadata"].get("deletionTimestamp")]


async def test_kernels_run_in_claimed_sandboxes_and_go_with_the_server(
    kernels_hub: Hub, k8s: Client
):
    await kernels_in_claimed_sandboxes(kernels_hub, k8s, "carol")


async def kernels_in_claimed_sandboxes(hub: Hub, k8s: Client, user: str) -> None:
    """``user``'s server (profile "kernels") runs its kernels in claimed Sandboxes, each
    without the server's credentials, labelled with the user; they go with the server."""
    ns = hub.namespace  # type: ignore[attr-defined]
    await hub.spawn(user, options=KERNELS)
    token = await hub.user_token(user)
    server_pod = k8s.get(PODS, ns, f"jupyter-{user}")
    assert server_pod["spec"]["serviceAccountName"] == "jupyter-sandbox-kernels"

    # A kernel runs in a pool member's pod, not in the server's; the claim names the user.
    probe = ("import os, socket; print(os.environ['JUPYTER_SANDBOX_RUNTIME'], "
             "socket.gethostname(), os.path.exists('/var/run/secrets/kubernetes.io'), "
             "os.path.exists('/etc/jupyter-sandbox/controller-key'), "
             "'JUPYTERHUB_API_TOKEN' in os.environ)")  # fmt: skip
    out = await hub.execute(user, token, probe, timeout=120, kernel_name=KERNELSPEC)
    runtime, hostname, *exposed = out.split()
    assert runtime == "kubernetes", out
    assert hostname != f"jupyter-{user}" and hostname.startswith("python-gvisor")
    # The kernel has none of the server's credentials: no token, no controller key.
    assert exposed == ["False", "False", "False"], out

    # A kernel left running (no browser): its claim is labelled with the user and the server.
    kernel_id = await hub.run_detached(
        user, token, "import time\nwhile True: time.sleep(1)", kernel_name=KERNELSPEC
    )
    of_user = f"{api.LABEL_KERNEL_USER}={user}"
    (claim,) = wait_for(lambda: live_claims(k8s, ns, of_user), 120, f"{user}'s kernel claim")
    labels = claim["metadata"]["labels"]
    assert labels[api.LABEL_KERNEL_ID] == kernel_id
    assert labels[api.LABEL_KERNEL_SERVER] == api.unique_label_value(hub_server_id(user))
    name = claim["metadata"]["name"]
    sandbox = wait_for(lambda: ((k8s.get(CLAIMS, ns, name) or {}).get("status") or {})
                       .get("sandbox", {}).get("name"), 60, "the claim's sandbox")  # fmt: skip
    assert k8s.get(PODS, ns, sandbox)["metadata"]["labels"][api.POD_LABEL_KERNEL_USER] == user
    # A claim the server will not end itself (as a crashed server leaves one).
    orphan = k8s.create(CLAIMS, ns, {"metadata": {
        "generateName": f"kernel-{user}-", "labels": {
            api.LABEL_KERNEL_USER: user,
            api.LABEL_KERNEL_SERVER: api.unique_label_value(hub_server_id(user))}},
        "spec": {"warmPoolRef": {"name": "python-gvisor"}}})  # fmt: skip

    # The server stops (hibernates): its kernels' claims and Sandboxes go with it.
    await hub.api("DELETE", f"/users/{user}/server")
    await hub.wait_stopped(user, timeout=120)
    assert live_claims(k8s, ns, of_user) == []
    # ... the one the server did not end too (the spawner deletes its server's claims).
    assert live_claims(k8s, ns, server_selector(hub_server_id(user))) == []
    left = k8s.get(CLAIMS, ns, orphan["metadata"]["name"])
    assert left is None or left["metadata"].get("deletionTimestamp")
    wait_for(lambda: k8s.get(SANDBOXES, ns, sandbox) is None, 60, "the kernel's Sandbox to go")
    wait_for(lambda: k8s.get(PODS, ns, sandbox) is None, 60, "the kernel's pod to go")
    # The user's own Sandbox stays, hibernated; the pool refills for the next kernels.
    assert k8s.get(SANDBOXES, ns, f"jupyter-{user}")["spec"]["operatingMode"] == "Suspended"
    wait_for(lambda: len(ready_members(k8s, ns)) == REPLICAS, 180, "the pool to refill")
