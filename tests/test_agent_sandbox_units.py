"""Pure parts of the Agent Sandbox implementation: names, conversion, CRDs, desired objects."""

from __future__ import annotations

import pytest

from agent_sandbox import api, conversion, crds
from agent_sandbox.__main__ import CRD_DIR, crd_yaml
from agent_sandbox.objects import claim as claim_objects
from agent_sandbox.objects import sandbox as sandbox_objects
from agent_sandbox.objects import warmpool as pool_objects


@pytest.mark.parametrize(
    ("name", "digest"), [("", "811c9dc5"), ("a", "e40c292c"), ("foobar", "bf9cf968")]
)
def test_name_hash_is_fnv1a_32(name, digest):
    assert api.name_hash(name) == digest


def test_shipped_crd_yaml_matches_the_generator():
    shipped = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert shipped == crd_yaml()


def test_crds_serve_both_versions_and_store_v1beta1():
    for crd in crds.all_crds():
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        assert set(versions) == {"v1alpha1", "v1beta1"}
        assert versions["v1beta1"]["storage"] and not versions["v1alpha1"]["storage"]
    pool = crds.crd(api.SANDBOX_WARM_POOL)
    assert pool["spec"]["names"]["shortNames"] == ["swp"]
    assert pool["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"] == (
        ".spec.replicas"
    )


def _sandbox(version: str, spec: dict) -> dict:
    return {
        "apiVersion": f"{api.CORE_GROUP}/{version}",
        "kind": "Sandbox",
        "metadata": {"name": "s"},
        "spec": spec,
    }


@pytest.mark.parametrize(("replicas", "mode"), [(0, "Suspended"), (1, "Running")])
def test_v1alpha1_replicas_is_operating_mode(replicas, mode):
    up = conversion.convert(_sandbox("v1alpha1", {"replicas": replicas}), "agents.x-k8s.io/v1beta1")
    assert up["spec"] == {"operatingMode": mode}
    down = conversion.convert(up, "agents.x-k8s.io/v1alpha1")
    assert down["spec"] == {"replicas": replicas}


def test_v1alpha1_claim_round_trip():
    alpha = {
        "apiVersion": "extensions.agents.x-k8s.io/v1alpha1",
        "kind": "SandboxClaim",
        "metadata": {"name": "c"},
        "spec": {"sandboxTemplateRef": {"name": "python"}},
    }
    beta = conversion.convert(alpha, "extensions.agents.x-k8s.io/v1beta1")
    assert beta["spec"]["warmPoolRef"] == {"name": "shadow-pool-python"}
    back = conversion.convert(beta, "extensions.agents.x-k8s.io/v1alpha1")
    assert back["spec"] == alpha["spec"] and not back["metadata"]["annotations"]


def test_conversion_review_reports_failures():
    review = {
        "request": {
            "uid": "1",
            "desiredAPIVersion": "agents.x-k8s.io/v1beta1",
            "objects": [{"kind": "Sandbox"}],
        }
    }
    response = conversion.review_response(review)["response"]
    assert response["uid"] == "1" and response["result"]["status"] == "Failure"


def _sandbox_obj(**spec) -> dict:
    return {
        "apiVersion": api.SANDBOX.api_version,
        "kind": "Sandbox",
        "metadata": {"name": "box", "namespace": "ns", "uid": "u1", "generation": 2},
        "spec": {
            "podTemplate": {
                "metadata": {"labels": {"app": "x", api.PREFIX + "evil": "1"}},
                "spec": {
                    "containers": [{"name": "c"}],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
            **spec,
        },
    }


def test_desired_pod_strips_reserved_keys_and_binds_claim_volumes():
    sb = _sandbox_obj(volumeClaimTemplates=[{"metadata": {"name": "data"}, "spec": {}}])
    pod = sandbox_objects.desired_pod(sb)
    assert pod["metadata"]["name"] == "box"
    labels = pod["metadata"]["labels"]
    assert labels["app"] == "x" and api.PREFIX + "evil" not in labels
    assert labels[api.LABEL_SANDBOX_NAME_HASH] == api.name_hash("box")
    assert pod["spec"]["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data-box"}}
    ]
    assert pod["metadata"]["ownerReferences"][0]["controller"] is True


def test_status_without_pod_and_suspended():
    status = sandbox_objects.sandbox_status(
        _sandbox_obj(operatingMode="Suspended"),
        pod=None,
        pods_owned=0,
        pod_not_owned=False,
        service=None,
        cluster_domain="cluster.local",
    )
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"]["reason"] == "SandboxSuspended"
    assert by_type["Suspended"] == {
        "type": "Suspended",
        "status": "True",
        "reason": "PodTerminated",
        "observedGeneration": 2,
    }
    assert status["podIPs"] == [] and status["nodeName"] is None


def test_pick_candidate_prefers_ready_then_oldest():
    def member(name, ready, stamp, ips=("10.0.0.1",)):
        return {
            "metadata": {"name": name, "creationTimestamp": stamp},
            "status": {
                "podIPs": list(ips),
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }

    members = [
        member("new-ready", True, "2026-01-02T00:00:00Z"),
        member("old-unready", False, "2026-01-01T00:00:00Z"),
        member("old-ready", True, "2026-01-01T00:00:00Z"),
        member("no-ip", True, "2025-01-01T00:00:00Z", ips=()),
    ]
    assert claim_objects.pick_candidate(members)["metadata"]["name"] == "old-ready"
    order = [m["metadata"]["name"] for m in pool_objects.scale_down_order(members[:3])]
    assert order[0] == "old-unready" and order[1] == "new-ready"


def test_claim_label_domains():
    template = {"spec": {"podTemplate": {"metadata": {"labels": {"sandbox.users.io/team": "a"}}}}}
    ok = {"spec": {"additionalPodMetadata": {"labels": {"sandbox.users.io/user": "x"}}}}
    claim_objects.validate_metadata(ok, template, ["sandbox.users.io"])
    for labels in ({"example.com/x": "1"}, {"sandbox.users.io/team": "b"}):
        bad = {"spec": {"additionalPodMetadata": {"labels": labels}}}
        with pytest.raises(claim_objects.Rejected) as err:
            claim_objects.validate_metadata(bad, template, ["sandbox.users.io"])
        assert err.value.reason == api.Reason.INVALID_METADATA
