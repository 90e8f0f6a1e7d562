"""Binder's preparation pods on the real node.

Node: the real one (testcluster/realnode.py): the preparation runs as a gVisor pod
from the node's image, with the security context, deadline and limits the
preparation's manifest gives it, on a cache that is a local PersistentVolume the
kubelet mounts (its subPaths included) and gives to the pod's group, and reaches pip's
index only through the service's egress proxy on the host, over the pod network.
The stand-in's test (test_binder_prepare.py) runs the same preparation faster.
"""

from __future__ import annotations

from test_binder_prepare import prepare_in_a_pod


async def test_a_preparation_pod_on_the_real_node(served, real):
    await prepare_in_a_pod(served, real.cluster, real.node)
