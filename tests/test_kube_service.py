"""The Hub service's controller: two replicas of sandbox-service (as two Hub replicas run
them), one leads, the other stays passive until the leader dies, then takes over.
Real processes on the test cluster, as the Hub's service account with the shipped RBAC;
a leader is killed with SIGKILL."""

from __future__ import annotations

import signal
import sys
import time

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


class HubAPI:
    """A stand-in for the Hub's API (no Hub runs in this test): it lists no users and
    notes which token asked, so that it shows which replica's hibernator sweeps."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.seen: list[str] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization", ""))
                body = b'{"items": [], "_pagination": {"next": null}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hub/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def askers(self, since: int = 0) -> set[str]:
        return set(self.seen[since:])


def test_two_services_hibernate_in_turn_not_together(cluster, namespace, tmp_path):
    """The hibernator follows a Lease as the controller does: of two replicas, one sweeps;
    when it dies (SIGKILL), the other takes over."""
    ns = namespace
    kubeconfig = hub_service_account(cluster, ns, tmp_path)
    hub = HubAPI()
    argv = [sys.executable, "-m", "sandbox_spawner.service", "--controller", "--hibernate",
            "--interval=0.5", "--kubeconfig", str(kubeconfig), f"--namespace={ns}",
            f"--lease-namespace={ns}", "--lease-duration=3", "--lease-renew=1"]  # fmt: skip
    services = [Process(f"hibernator-{i}-{ns}", argv, cluster.workdir, env={
        "JUPYTERHUB_API_URL": hub.url, "JUPYTERHUB_API_TOKEN": f"replica-{i}",
    }).start() for i in (1, 2)]  # fmt: skip
    try:
        wait_for(lambda: hub.seen, 60, "a sweep")
        time.sleep(4)  # many sweeps' worth
        askers = hub.askers()
        assert len(askers) == 1, askers
        leading = next(s for s, i in zip(services, (1, 2), strict=True)
                       if askers == {f"token replica-{i}"})  # fmt: skip
        other = "replica-2" if leading is services[0] else "replica-1"
        leading.stop(signal.SIGKILL)
        mark = len(hub.seen)
        wait_for(lambda: f"token {other}" in hub.askers(mark), 30, "the takeover")
        time.sleep(2)
        assert hub.askers(len(hub.seen) - 3) == {f"token {other}"}
        for service in services:
            assert "forbidden" not in service.log().lower(), service.log()
    finally:
        for service in services:
            service.stop()
        hub.server.shutdown()
