"""The controller killed at any point converges; two replicas share one Lease; metrics."""

from __future__ import annotations

import base64
import json
import signal
import ssl
import time
import urllib.request

from cluster_fixtures import controller_process, wait_for, wait_for_leader
from test_pool_controller import (
    claim_body,
    claim_condition,
    make_pool,
    make_template,
    members,
    pool_ready,
)

from agent_sandbox import api
from agent_sandbox.kube import CLAIMS, LEASES, PODS, TEMPLATES, WARM_POOLS


def _lease_holder(k8s) -> str:
    lease = k8s.get(LEASES, "default", "agent-sandbox-controller") or {}
    return (lease.get("spec") or {}).get("holderIdentity") or ""


def test_killed_mid_refill_converges_without_duplicates(k8s, namespace, controller):
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=0)
    k8s.patch(WARM_POOLS, namespace, "pool", {"spec": {"replicas": 8}})
    wait_for(lambda: len(members(k8s, namespace)) >= 1, 30, "the refill to begin")
    controller.stop(signal.SIGKILL)  # mid-refill, no chance to clean up
    controller.start()
    wait_for_leader(k8s.cluster, controller)
    pool_ready(k8s, namespace, 8, timeout=120)
    time.sleep(2)  # anything still in flight would show now
    names = {m["metadata"]["name"] for m in members(k8s, namespace)}
    assert len(names) == 8
    pods = [p for p in k8s.list(PODS, namespace) if api.LABEL_SANDBOX_NAME_HASH in
            p["metadata"].get("labels", {})]  # fmt: skip
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(names)  # one pod each, no orphan


def test_standby_replica_takes_over(k8s, namespace, controller):
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=1)
    pool_ready(k8s, namespace, 1)
    standby = controller_process(k8s.cluster, "controller-standby").start()
    try:
        time.sleep(3)
        leader = _lease_holder(k8s)
        assert leader, "the first controller holds the lease"
        controller.stop(signal.SIGKILL)
        wait_for_leader(k8s.cluster, standby, timeout=30)
        assert _lease_holder(k8s) != leader
        # The new leader reconciles: a claim adopts and the pool refills.
        k8s.create(CLAIMS, namespace, claim_body("after-failover"))
        claim_condition(k8s, namespace, "after-failover")
        pool_ready(k8s, namespace, 1)
    finally:
        controller.start()  # back as the session's controller: it leads once the standby goes
        standby.stop()
        wait_for_leader(k8s.cluster, controller, timeout=30)


def test_claim_startup_latency_metric(k8s, namespace, controller):
    make_template(k8s, namespace)
    make_pool(k8s, namespace, replicas=1)
    pool_ready(k8s, namespace, 1)
    k8s.create(CLAIMS, namespace, claim_body("measured"))
    claim_condition(k8s, namespace, "measured")
    url = f"http://127.0.0.1:{controller.metrics_port}/metrics"

    def warm_count() -> float:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith('agent_sandbox_claim_startup_latency_ms_count{launch_type="warm"}'):
                return float(line.split()[-1])
        return 0.0

    assert wait_for(lambda: warm_count() >= 1, 10, "the warm claim observed")
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'agent_sandbox_reconcile_total{kind="SandboxClaim"}' in text


def test_every_replica_serves_the_webhook_the_crds_trust(k8s, controller):
    """A Service may route the API server's conversion call to any replica: each one's
    certificate must chain to the CA in the CRDs (one CA, shared through a Secret)."""
    standby = controller_process(k8s.cluster, "controller-webhook-standby").start()
    try:
        path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/sandboxes.agents.x-k8s.io"
        _, crd = k8s.cluster.request("GET", path)
        ca = base64.b64decode(crd["spec"]["conversion"]["webhook"]["clientConfig"]["caBundle"])
        trusted = ssl.create_default_context(cadata=ca.decode())
        review = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
                  "request": {"uid": "u1", "desiredAPIVersion": "agents.x-k8s.io/v1beta1",
                              "objects": []}}  # fmt: skip

        def converts(port: int) -> bool:
            request = urllib.request.Request(
                f"https://127.0.0.1:{port}/convert", data=json.dumps(review).encode(),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:
                answer = json.loads(urllib.request.urlopen(request, context=trusted, timeout=5)
                                    .read())  # fmt: skip
            except OSError:
                return False
            return answer["response"]["uid"] == "u1"

        assert wait_for(lambda: converts(standby.webhook_port), 30, "the standby's webhook")
        assert converts(controller.webhook_port)
    finally:
        standby.stop()


def test_killed_before_a_claims_deferred_writes_converges(k8s, namespace, controller):
    """A warm claim's Ready costs three writes; the rest (its pod's labels, its Sandbox's
    status, the Event, the refill) waits while other claims wait. A controller killed in
    between leaves the claim Ready, and the next one finishes the work."""
    ns = namespace
    make_template(k8s, ns)
    make_pool(k8s, ns, replicas=1)
    # A claim that waits as long as this test needs: its cold sandbox is never scheduled.
    container = {"name": "agent", "image": "python:3.11", "command": ["sleep", "infinity"]}
    k8s.create(TEMPLATES, ns, {"metadata": {"name": "stuck"}, "spec": {"podTemplate": {
        "spec": {"nodeSelector": {"no-such": "node"}, "containers": [container]}}}})  # fmt: skip
    make_pool(k8s, ns, name="empty", replicas=0, template="stuck")
    pool_ready(k8s, ns, 1)
    (member,) = members(k8s, ns)
    controller.stop()
    holding = controller_process(k8s.cluster, "controller-holding", "--burst-hold", "120")
    try:
        holding.start()
        wait_for_leader(k8s.cluster, holding)
        # Its first reconciles of what exists (queued before any claim waits) are done.
        url = f"http://127.0.0.1:{holding.metrics_port}/metrics"  # type: ignore[attr-defined]
        wait_for(lambda: 'agent_sandbox_reconcile_total{kind="Sandbox"}'
                 in urllib.request.urlopen(url, timeout=5).read().decode(), 30,
                 "the first Sandbox reconcile")  # fmt: skip
        time.sleep(1)
        k8s.create(CLAIMS, ns, claim_body("waiting", pool="empty"))
        labels = {api.POD_LABEL_KERNEL_ID: "k-1"}
        k8s.create(CLAIMS, ns, claim_body("served", additionalPodMetadata={"labels": labels}))
        claim_condition(k8s, ns, "served")
        claim = k8s.get(CLAIMS, ns, "served")
        assert claim["status"]["sandbox"]["name"] == member["metadata"]["name"]
        time.sleep(1)  # the deferred work would show now, were it not held
        pod = k8s.get(PODS, ns, member["metadata"]["name"])
        assert api.POD_LABEL_KERNEL_ID not in pod["metadata"]["labels"], "not held back"
        assert len(members(k8s, ns)) == 0, "the refill waits behind the waiting claim"
        holding.stop(signal.SIGKILL)
    finally:
        holding.stop()
        controller.start()
    wait_for_leader(k8s.cluster, controller)
    wait_for(lambda: (k8s.get(PODS, ns, member["metadata"]["name"])["metadata"]["labels"]
                      .get(api.POD_LABEL_KERNEL_ID) == "k-1"), 30, "the pod's labels")  # fmt: skip
    pool_ready(k8s, ns, 1)  # refilled
    claim = claim_condition(k8s, ns, "served")  # still Ready, on the same sandbox
    assert claim["status"]["sandbox"]["name"] == member["metadata"]["name"]
