"""Upstream's own Python SDK (k8s-agent-sandbox) against this controller."""

from __future__ import annotations

import pytest
from cluster_fixtures import wait_for
from test_pool_controller import make_pool, make_template, pool_ready

from agent_sandbox.kube import CLAIMS, SANDBOXES

pytestmark = pytest.mark.usefixtures("controller")


def test_sdk_create_and_delete_sandbox(k8s, namespace):
    import kubernetes  # the SDK's own dependency
    from k8s_agent_sandbox import SandboxClient

    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=1)
    pool_ready(k8s, namespace, 1)
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(k8s.cluster.kubeconfig), client_configuration=config)
    client = SandboxClient(api_client=kubernetes.client.ApiClient(config))
    sandbox = client.create_sandbox(
        "pool", namespace=namespace, sandbox_ready_timeout=60,
        pod_labels={"sandbox.users.io/user": "sdk"},
    )  # fmt: skip
    assert sandbox.sandbox_id.startswith("pool-")  # adopted from the warm pool
    claim = k8s.get(CLAIMS, namespace, sandbox.claim_name)
    assert claim["status"]["sandbox"]["name"] == sandbox.sandbox_id
    assert claim["metadata"]["name"].startswith("sandbox-claim-")
    client.delete_sandbox(sandbox.claim_name, namespace=namespace)
    wait_for(lambda: k8s.get(SANDBOXES, namespace, sandbox.sandbox_id) is None, 30, "deleted")
