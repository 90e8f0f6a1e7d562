"""The Hub service's controller: two replicas of sandbox-service (as two Hub replicas run
them), one leads, the other stays passive until the leader dies, then takes over.
Real processes on the test cluster, as the Hub's service account with the shipped RBAC;
a leader is killed with SIGKILL."""

from __future__ import annotations

import signal
import sys

from cluster_fixtures import Client, Process, hub_service_account, wait_for

from agent_sandbox.kube import LEASES, PODS, SANDBOXES


def holder(k8s: Client, ns: str) -> str:
    lease = k8s.get(LEASES, ns, "agent-sandbox-controller") or {}
    return (lease.get("spec") or {}).get("holderIdentity") or ""


def test_two_services_one_leads_the_other_takes_over(cluster, node_agent, namespace,
                                                      k8s: Client, tmp_path):  # fmt: skip
    ns = namespace
    # As the Hub's service account, with the shipped RBAC only.
    kubeconfig = hub_service_account(cluster, ns, tmp_path)
    argv = [sys.executable, "-m", "sandbox_spawner.service", "--controller",
            "--kubeconfig", str(kubeconfig), f"--namespace={ns}",
            f"--lease-namespace={ns}", "--lease-duration=3", "--lease-renew=1"]  # fmt: skip
    services = [Process(f"service-{i}-{ns}", argv, cluster.workdir).start() for i in (1, 2)]
    try:
        leader = wait_for(lambda: holder(k8s, ns), 60, "a leader")
        pids = [s.proc.pid for s in services]
        leading = [s for s in services if f"_{s.proc.pid}_" in leader]
        assert len(leading) == 1, (leader, pids)
        passive = next(s for s in services if s is not leading[0])
        assert "became leader" not in passive.log()  # it waits, reconciling nothing
        leading[0].stop(signal.SIGKILL)
        wait_for(lambda: f"_{passive.proc.pid}_" in holder(k8s, ns), 30, "the takeover")
        # The new leader reconciles: a Sandbox gets its pod.
        container = {"name": "c", "image": "busybox", "command": ["sleep", "infinity"]}
        spec = {"podTemplate": {"spec": {"containers": [container]}}}
        k8s.create(SANDBOXES, ns, {"metadata": {"name": "after-takeover"}, "spec": spec})
        wait_for(lambda: k8s.get(PODS, ns, "after-takeover"), 60, "the Sandbox's pod")
        assert "became leader" in passive.log()
        for service in services:
            assert "forbidden" not in service.log().lower(), service.log()
    finally:
        for service in services:
            service.stop()
