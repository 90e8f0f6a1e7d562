"""The shipped RBAC (jupyter_config/kubernetes/rbac.yaml) on the test cluster's API server,
which authorizes with RBAC: applied as documented, it grants the Hub's service account what
the controller does, in the Hub's namespace only, and the per-kernel account claims only.
Checked with SubjectAccessReviews, the API server's own answer."""

from __future__ import annotations

import uuid

import pytest
from cluster_fixtures import apply_rbac


@pytest.fixture
def applied(cluster, namespace):
    created = apply_rbac(cluster, namespace)
    yield namespace
    for path in created:
        cluster.request("DELETE", path)


def allowed(cluster, user: str, verb: str, resource: str, namespace: str, group: str = "",
            subresource: str = "", name: str = "") -> bool:  # fmt: skip
    review = {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts"], "resourceAttributes": {
            "namespace": namespace, "verb": verb, "group": group, "resource": resource,
            "subresource": subresource, "name": name}},
    }  # fmt: skip
    status, body = cluster.request(
        "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review
    )
    assert status == 201, body
    return bool(body["status"].get("allowed"))


def test_the_hub_runs_the_controller_in_its_namespace_only(cluster, applied):
    ns = applied
    hub = f"system:serviceaccount:{ns}:hub"
    elsewhere = f"other-{uuid.uuid4().hex[:6]}"
    for verb, resource, group, sub in (
        ("watch", "sandboxes", "agents.x-k8s.io", ""),
        ("patch", "sandboxes", "agents.x-k8s.io", "status"),
        ("create", "sandboxes", "agents.x-k8s.io", ""),
        ("update", "sandboxclaims", "extensions.agents.x-k8s.io", "status"),
        ("create", "pods", "", ""),
        ("delete", "persistentvolumeclaims", "", ""),
        ("create", "networkpolicies", "networking.k8s.io", ""),
        ("update", "leases", "coordination.k8s.io", ""),
        ("create", "events", "", ""),
    ):
        assert allowed(cluster, hub, verb, resource, ns, group, sub), (verb, resource, sub)
    # Nothing in another namespace, no secret but the webhook CA, no CRD.
    assert not allowed(cluster, hub, "create", "pods", elsewhere)
    assert not allowed(cluster, hub, "get", "secrets", ns, name="someone-elses")
    assert allowed(cluster, hub, "get", "secrets", ns, name="agent-sandbox-webhook-ca")
    assert not allowed(cluster, hub, "update", "customresourcedefinitions", "",
                       "apiextensions.k8s.io")  # fmt: skip


def test_the_kernel_account_only_claims(cluster, applied):
    ns = applied
    kernels = f"system:serviceaccount:{ns}:jupyter-sandbox-kernels"
    assert allowed(cluster, kernels, "create", "sandboxclaims", ns, "extensions.agents.x-k8s.io")
    assert allowed(cluster, kernels, "delete", "sandboxclaims", ns, "extensions.agents.x-k8s.io")
    assert not allowed(cluster, kernels, "create", "pods", ns)
    assert not allowed(cluster, kernels, "patch", "sandboxes", ns, "agents.x-k8s.io")
    assert not allowed(cluster, kernels, "create", "sandboxclaims", "default",
                       "extensions.agents.x-k8s.io")  # fmt: skip
