"""Templates, warm pools and claims on the real API server, pods run by the node agent."""

from __future__ import annotations

import datetime

import pytest
from cluster_fixtures import condition, wait_condition, wait_for

from agent_sandbox import api
from agent_sandbox.kube import (
    CLAIMS,
    EVENTS,
    NETWORK_POLICIES,
    PODS,
    SANDBOXES,
    TEMPLATES,
    WARM_POOLS,
)

pytestmark = pytest.mark.usefixtures("controller")


def make_template(k8s, ns: str, name: str = "python", **spec) -> dict:
    return k8s.create(
        TEMPLATES,
        ns,
        {
            "metadata": {"name": name},
            "spec": {
                "podTemplate": {
                    "spec": {
                        "containers": [
                            {
                                "name": "agent",
                                "image": "python:3.11",
                                "command": ["sleep", "infinity"],
                                "env": [{"name": "FROM_TEMPLATE", "value": "1"}],
                            }
                        ]
                    }
                },
                **spec,
            },
        },
    )


def make_pool(
    k8s, ns: str, name: str = "pool", replicas: int = 2, template: str = "python", **spec
) -> dict:
    return k8s.create(
        WARM_POOLS,
        ns,
        {
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "sandboxTemplateRef": {"name": template}, **spec},
        },
    )


def members(k8s, ns: str, pool: str = "pool") -> list[dict]:
    return k8s.list(SANDBOXES, ns, f"{api.LABEL_WARM_POOL_SANDBOX}={api.name_hash(pool)}")


def pool_ready(k8s, ns: str, count: int, pool: str = "pool", timeout: float = 90) -> dict:
    return wait_for(
        lambda: (
            (p := k8s.get(WARM_POOLS, ns, pool))
            and (p.get("status") or {}).get("readyReplicas") == count
            and len(members(k8s, ns, pool)) == count
            and p
        ),
        timeout,
        f"{count} ready members",
    )


def claim_body(name: str, pool: str = "pool", **spec) -> dict:
    return {"metadata": {"name": name}, "spec": {"warmPoolRef": {"name": pool}, **spec}}


def claim_condition(k8s, ns: str, name: str, reason: str | None = None, timeout: float = 60):
    return wait_condition(k8s, CLAIMS, ns, name, "Ready", reason=reason, timeout=timeout)


def events_for(k8s, ns: str, name: str) -> list[str]:
    return [e["reason"] for e in k8s.list(EVENTS, ns) if e["involvedObject"]["name"] == name]


def test_template_gets_secure_network_policy(k8s, namespace):
    make_template(k8s, namespace)
    policy = wait_for(
        lambda: k8s.get(NETWORK_POLICIES, namespace, "python-network-policy"), 30, "network policy"
    )
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        api.LABEL_TEMPLATE_REF_HASH: api.name_hash("python")
    }
    egress = policy["spec"]["egress"][0]["to"][0]["ipBlock"]
    assert egress["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in egress["except"]
    assert "169.254.0.0/16" in egress["except"]
    k8s.patch(TEMPLATES, namespace, "python", {"spec": {"networkPolicyManagement": "Unmanaged"}})
    wait_for(
        lambda: k8s.get(NETWORK_POLICIES, namespace, "python-network-policy") is None,
        30,
        "unmanaged policy removed",
    )


def test_warm_pool_fills_scales_and_members_are_secure(k8s, namespace):
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=3)
    pool = pool_ready(k8s, namespace, 3)
    assert pool["status"]["selector"] == f"{api.LABEL_WARM_POOL_SANDBOX}={api.name_hash('pool')}"
    member = members(k8s, namespace)[0]
    assert member["metadata"]["name"].startswith("pool-")
    labels = member["metadata"]["labels"]
    assert labels[api.LABEL_LAUNCH_TYPE] == "warm" and labels[api.LABEL_CREATED_BY] == "controller"
    pod_spec = member["spec"]["podTemplate"]["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["dnsPolicy"] == "None"
    pod = k8s.get(PODS, namespace, member["metadata"]["name"])
    assert pod["metadata"]["annotations"][api.ANNOTATION_SAFE_TO_EVICT] == "true"
    # The scale subresource, as `kubectl scale swp pool --replicas=1` uses it.
    k8s.patch(WARM_POOLS, namespace, "pool", {"spec": {"replicas": 1}}, sub="scale")
    pool_ready(k8s, namespace, 1)


def test_claim_adopts_warm_member_and_pool_refills(k8s, namespace):
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=2)
    pool_ready(k8s, namespace, 2)
    warm = {m["metadata"]["name"] for m in members(k8s, namespace)}
    k8s.create(
        CLAIMS,
        namespace,
        claim_body("mine", additionalPodMetadata={"labels": {"sandbox.users.io/user": "alice"}}),
    )
    claim = claim_condition(k8s, namespace, "mine")
    name = claim["status"]["sandbox"]["name"]
    assert name in warm  # the adopted sandbox keeps its pool name
    assert claim["status"]["sandbox"]["podIPs"]
    sandbox = k8s.get(SANDBOXES, namespace, name)
    assert sandbox["metadata"]["ownerReferences"][0]["uid"] == claim["metadata"]["uid"]
    assert api.LABEL_WARM_POOL_SANDBOX not in sandbox["metadata"]["labels"]
    assert sandbox["metadata"]["labels"][api.LABEL_CLAIM_UID] == claim["metadata"]["uid"]
    pod = wait_for(
        lambda: (
            (p := k8s.get(PODS, namespace, name))
            and p["metadata"]["labels"].get("sandbox.users.io/user") == "alice"
            and p
        ),
        30,
        "claim labels on the pod",
    )
    assert api.ANNOTATION_SAFE_TO_EVICT not in pod["metadata"].get("annotations", {})
    assert "SandboxAdopted" in events_for(k8s, namespace, "mine")
    pool_ready(k8s, namespace, 2)  # refilled
    assert name not in {m["metadata"]["name"] for m in members(k8s, namespace)}
    # Deleting the claim deletes its sandbox (ownerReference garbage collection).
    k8s.delete(CLAIMS, namespace, "mine")
    wait_for(lambda: k8s.get(SANDBOXES, namespace, name) is None, 30, "sandbox collected")


def test_env_injection_is_gated_by_the_template(k8s, namespace):
    make_template(k8s, namespace, "locked")
    make_template(k8s, namespace, "open", envVarsInjectionPolicy="Allowed")
    make_pool(k8s, namespace, "locked-pool", replicas=0, template="locked")
    make_pool(k8s, namespace, "open-pool", replicas=0, template="open")
    env = [{"name": "TOKEN", "value": "abc"}]
    k8s.create(CLAIMS, namespace, claim_body("rejected", "locked-pool", env=env))
    claim = claim_condition(k8s, namespace, "rejected", "EnvVarsInjectionRejected")
    assert "Disallowed" in condition(claim, "Ready")["message"]
    assert "EnvVarsInjectionRejected" in events_for(k8s, namespace, "rejected")
    assert k8s.get(SANDBOXES, namespace, "rejected") is None

    k8s.create(CLAIMS, namespace, claim_body("cold", "open-pool", env=env))
    claim = claim_condition(k8s, namespace, "cold")
    assert claim["status"]["sandbox"]["name"] == "cold"  # a cold start is named as the claim
    sandbox = k8s.get(SANDBOXES, namespace, "cold")
    assert sandbox["metadata"]["labels"][api.LABEL_LAUNCH_TYPE] == "cold"
    container = sandbox["spec"]["podTemplate"]["spec"]["containers"][0]
    assert {"name": "TOKEN", "value": "abc"} in container["env"]
    # Overriding a template variable needs the Overrides policy.
    k8s.create(
        CLAIMS,
        namespace,
        claim_body("override", "open-pool", env=[{"name": "FROM_TEMPLATE", "value": "2"}]),
    )
    claim_condition(k8s, namespace, "override", "EnvVarsInjectionRejected")


def test_claim_errors_are_conditions(k8s, namespace):
    k8s.create(CLAIMS, namespace, claim_body("lost", "no-such-pool"))
    claim_condition(k8s, namespace, "lost", "WarmPoolNotFound")
    make_pool(k8s, namespace, "orphan-pool", replicas=0, template="no-such-template")
    k8s.create(CLAIMS, namespace, claim_body("orphan", "orphan-pool"))
    claim_condition(k8s, namespace, "orphan", "TemplateNotFound")
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=0)
    k8s.create(
        CLAIMS,
        namespace,
        claim_body("badlabel", additionalPodMetadata={"labels": {"evil.example.com/x": "1"}}),
    )
    claim = claim_condition(k8s, namespace, "badlabel", "InvalidMetadata")
    assert "allowed domains" in condition(claim, "Ready")["message"]


def _in(seconds: float) -> str:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_claim_expiry_policies(k8s, namespace):
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=0)  # cold starts
    k8s.create(CLAIMS, namespace, claim_body("retain", lifecycle={"shutdownTime": _in(6)}))
    k8s.create(
        CLAIMS,
        namespace,
        claim_body("gone", lifecycle={"shutdownTime": _in(6), "shutdownPolicy": "Delete"}),
    )
    claim_condition(k8s, namespace, "retain", timeout=60)
    claim = claim_condition(k8s, namespace, "retain", "ClaimExpired", timeout=60)
    assert "ClaimExpired" in events_for(k8s, namespace, "retain")
    wait_for(lambda: k8s.get(SANDBOXES, namespace, "retain") is None, 30, "sandbox deleted")
    assert k8s.get(CLAIMS, namespace, "retain")["metadata"]["uid"] == claim["metadata"]["uid"]
    wait_for(lambda: k8s.get(CLAIMS, namespace, "gone") is None, 60, "claim deleted")


def test_never_ready_members_are_replaced(k8s, namespace):
    """The session's controller runs with --warm-pool-readiness-grace 20 (not less: gVisor
    kernel sandboxes take seconds to become ready)."""
    k8s.create(TEMPLATES, namespace, {
        "metadata": {"name": "broken"},
        "spec": {"podTemplate": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "agent", "image": "none", "command": ["/nonexistent/agent"]}]}}},
    })  # fmt: skip
    make_pool(k8s, namespace, replicas=1, template="broken")
    first = wait_for(lambda: members(k8s, namespace), 30, "a member")[0]["metadata"]["name"]
    replaced = wait_for(
        lambda: [m for m in members(k8s, namespace) if m["metadata"]["name"] != first],
        60, "a replacement member",
    )  # fmt: skip
    assert len(replaced) == 1
    wait_for(lambda: k8s.get(SANDBOXES, namespace, first) is None, 30, "the stuck one deleted")
