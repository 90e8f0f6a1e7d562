"""The per-kernel profile of the shipped Kubernetes Hub configuration on the real node.

Node: the real one (testcluster/realnode.py): the trusted server is a runc pod holding
the service account token the kubelet mounts (the ServiceAccount admission plugin and
its token controller, not the stand-in's copy), which reaches the API server through
the ``kubernetes`` Service (kube-proxy) and its kernels' gVisor pods at their own
addresses, pod to pod. The stand-in's test (test_kube_hub_kernels.py) shares the body.

A module of its own: its Hub's service then leads the controller's lease once the
previous module's Hub has gone, as one Hub of a cluster would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_fixtures import Client
from hub_fixtures import Hub, real_node_hub_config
from test_kube_hub_kernels import KERNELS, kernels_in_claimed_sandboxes, start_kernels_hub

from agent_sandbox.kube import PODS


@pytest.fixture(scope="module")
def real_kernels_hub(tmp_path_factory, real) -> Iterator[Hub]:
    """A Hub whose "kernels" profile's servers claim their kernels from the shipped pool,
    everything on the real node (the image has the cluster kernelspecs)."""
    real.node.local_volumes(real.cluster, "kernels-home", 1)
    hub = start_kernels_hub(tmp_path_factory, real.cluster, real_node_hub_config(real.node),
                            imagePullPolicy="IfNotPresent")  # fmt: skip
    yield hub
    hub.close()
    real.cluster.request("DELETE", f"/api/v1/namespaces/{hub.namespace}")  # type: ignore[attr-defined]


async def test_the_per_kernel_profile_on_the_real_node(real_kernels_hub: Hub, real_k8s: Client):
    """The trusted server is a pod with the service account token the kubelet mounts
    (the ServiceAccount admission plugin and its token controller, not a stand-in's
    copy); it reaches the API server through the ``kubernetes`` Service's ClusterIP
    (kube-proxy) and its kernels' gVisor pods at their addresses, pod to pod."""
    hub, k8s = real_kernels_hub, real_k8s
    ns = hub.namespace  # type: ignore[attr-defined]
    await hub.spawn("cy", options=KERNELS)
    server = k8s.get(PODS, ns, "jupyter-cy")
    mounts = {m["mountPath"]: m["name"] for m in server["spec"]["containers"][0]["volumeMounts"]}
    token_volume = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
    (volume,) = [v for v in server["spec"]["volumes"] if v["name"] == token_volume]
    assert volume["secret"]["secretName"].startswith("jupyter-sandbox-kernels-token-")
    # With that token alone, the server claims, labels and ends its kernels' Sandboxes.
    await kernels_in_claimed_sandboxes(hub, k8s, "cy")
