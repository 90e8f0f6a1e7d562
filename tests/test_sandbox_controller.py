"""The Sandbox API and its reconciler on a real kube-apiserver, pods run by the node agent."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cluster_fixtures import condition, wait_condition, wait_for

from agent_sandbox import api
from agent_sandbox.kube import PODS, PVCS, SANDBOXES, SERVICES, Resource

pytestmark = pytest.mark.usefixtures("controller")

V1ALPHA1_SANDBOXES = Resource(api.CORE_GROUP, api.V1ALPHA1, "sandboxes", "Sandbox")


def sandbox_body(name: str, command: list[str] | None = None, **spec) -> dict:
    container = {
        "name": "agent",
        "image": "python:3.11",
        "command": command or ["sleep", "infinity"],
    }
    return {
        "metadata": {"name": name},
        "spec": {"podTemplate": {"spec": {"containers": [container]}}, **spec},
    }


def ready(k8s, ns: str, name: str, timeout: float = 60) -> dict:
    return wait_condition(k8s, SANDBOXES, ns, name, "Ready", timeout=timeout)


def test_v1alpha1_example_reaches_ready(k8s, namespace):
    """The classic upstream example, as written, through the conversion webhook."""
    example = {
        "apiVersion": "agents.x-k8s.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": "my-sandbox"},
        "spec": {
            "podTemplate": {
                "spec": {
                    "runtimeClassName": "gvisor",
                    "containers": [{"name": "agent", "image": "your-agent-image:latest"}],
                }
            }
        },
    }
    status, created = k8s.cluster.request("POST", V1ALPHA1_SANDBOXES.path(namespace), example)
    assert status == 201, created
    assert created["apiVersion"] == "agents.x-k8s.io/v1alpha1" and created["spec"]["replicas"] == 1
    sandbox = ready(k8s, namespace, "my-sandbox")
    assert sandbox["spec"]["operatingMode"] == "Running"
    assert (
        sandbox["status"]["selector"]
        == f"{api.LABEL_SANDBOX_NAME_HASH}={api.name_hash('my-sandbox')}"
    )
    assert sandbox["status"]["podIPs"] and sandbox["status"]["nodeName"]
    pod = k8s.get(PODS, namespace, "my-sandbox")
    assert pod["metadata"]["labels"][api.LABEL_SANDBOX_NAME_HASH] == api.name_hash("my-sandbox")
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Sandbox" and owner["uid"] == sandbox["metadata"]["uid"]
    assert owner["controller"] is True
    # v1alpha1 replicas: 0 is v1beta1 Suspended, both ways.
    status, _ = k8s.cluster.request(
        "PATCH",
        V1ALPHA1_SANDBOXES.path(namespace, "my-sandbox"),
        {"spec": {"replicas": 0}},
        "application/merge-patch+json",
    )
    assert status == 200
    assert k8s.get(SANDBOXES, namespace, "my-sandbox")["spec"]["operatingMode"] == "Suspended"
    wait_for(lambda: k8s.get(PODS, namespace, "my-sandbox") is None, 30, "pod deleted")
    status, alpha = k8s.cluster.request("GET", V1ALPHA1_SANDBOXES.path(namespace, "my-sandbox"))
    assert alpha["spec"]["replicas"] == 0 and "operatingMode" not in alpha["spec"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.podTemplate"),
        (
            {"podTemplate": {"spec": {"containers": [{"name": "a"}]}}, "operatingMode": "Paused"},
            "spec.operatingMode",
        ),
        ({"podTemplate": {"spec": {}}}, "spec.podTemplate.spec.containers"),
        (
            {"podTemplate": {"spec": {"containers": [{"name": "a"}]}}, "shutdownPolicy": "Later"},
            "spec.shutdownPolicy",
        ),
    ],
)
def test_schema_violations_are_rejected_with_422(k8s, namespace, spec, field):
    status, body = k8s.cluster.request(
        "POST",
        SANDBOXES.path(namespace),
        {
            "apiVersion": api.SANDBOX.api_version,
            "kind": "Sandbox",
            "metadata": {"name": "bad"},
            "spec": spec,
        },
    )
    assert status == 422, body
    assert field in body["message"]


def test_suspend_and_resume_keep_the_volume(k8s, namespace, node_agent):
    command = [
        "sh",
        "-c",
        "cat /data/log > /data/seen 2>/dev/null; date >> /data/log; exec sleep infinity",
    ]
    body = sandbox_body("keeper", command)
    body["spec"]["podTemplate"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "data", "mountPath": "/data"}
    ]
    body["spec"]["volumeClaimTemplates"] = [
        {
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
    ]
    k8s.create(SANDBOXES, namespace, body)
    first = ready(k8s, namespace, "keeper")
    pvc = k8s.get(PVCS, namespace, "data-keeper")
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
    volume_dir = Path(node_agent.root) / "pvc" / namespace / "data-keeper"
    log = volume_dir / "log"
    wait_for(lambda: log.exists() and log.read_text().endswith("\n"), 30, "a line in the volume")
    first_line = (volume_dir / "log").read_text()

    k8s.patch(SANDBOXES, namespace, "keeper", {"spec": {"operatingMode": "Suspended"}})
    suspended = wait_condition(k8s, SANDBOXES, namespace, "keeper", "Suspended", timeout=30)
    assert condition(suspended, "Suspended")["reason"] == "PodTerminated"
    assert condition(suspended, "Ready")["reason"] == "SandboxSuspended"
    assert suspended["status"]["podIPs"] == []
    assert k8s.get(PODS, namespace, "keeper") is None
    assert k8s.get(PVCS, namespace, "data-keeper") is not None

    k8s.patch(SANDBOXES, namespace, "keeper", {"spec": {"operatingMode": "Running"}})
    resumed = ready(k8s, namespace, "keeper")
    assert condition(resumed, "Suspended")["reason"] == "NotSuspended"
    wait_for(lambda: (volume_dir / "seen").exists(), 30, "the resumed pod read the volume")
    assert (volume_dir / "seen").read_text() == first_line


def test_headless_service(k8s, namespace):
    body = sandbox_body("served")
    body["spec"]["podTemplate"]["spec"]["containers"][0]["ports"] = [{"containerPort": 8888}]
    body["spec"]["service"] = True
    k8s.create(SANDBOXES, namespace, body)
    sandbox = ready(k8s, namespace, "served")
    service = k8s.get(SERVICES, namespace, "served")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {api.LABEL_SANDBOX_NAME_HASH: api.name_hash("served")}
    assert service["spec"]["ports"][0]["name"] == "p-8888-tcp"
    assert sandbox["status"]["serviceFQDN"] == f"served.{namespace}.svc.cluster.local"
    k8s.patch(SANDBOXES, namespace, "served", {"spec": {"service": False}})
    wait_for(lambda: k8s.get(SERVICES, namespace, "served") is None, 30, "service deleted")


def _in(seconds: float) -> str:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_shutdown_time_retain_and_delete(k8s, namespace):
    k8s.create(SANDBOXES, namespace, sandbox_body("retained", shutdownTime=_in(4)))
    k8s.create(
        SANDBOXES, namespace, sandbox_body("deleted", shutdownTime=_in(4), shutdownPolicy="Delete")
    )
    ready(k8s, namespace, "retained")
    expired = wait_condition(
        k8s, SANDBOXES, namespace, "retained", "Ready", reason="SandboxExpired", timeout=30
    )
    assert not expired["status"].get("podIPs")
    wait_for(lambda: k8s.get(PODS, namespace, "retained") is None, 30, "expired pod deleted")
    wait_for(lambda: k8s.get(SANDBOXES, namespace, "deleted") is None, 30, "Delete policy")


def test_deleting_a_sandbox_removes_its_pod(k8s, namespace):
    k8s.create(SANDBOXES, namespace, sandbox_body("short"))
    ready(k8s, namespace, "short")
    assert k8s.delete(SANDBOXES, namespace, "short") == 200
    wait_for(lambda: k8s.get(PODS, namespace, "short") is None, 30, "pod garbage-collected")


def test_pod_exit_is_reported(k8s, namespace):
    body = sandbox_body("oneshot", ["sh", "-c", "exit 3"])
    body["spec"]["podTemplate"]["spec"]["restartPolicy"] = "Never"
    k8s.create(SANDBOXES, namespace, body)
    finished = wait_condition(k8s, SANDBOXES, namespace, "oneshot", "Finished", timeout=60)
    assert condition(finished, "Finished")["reason"] == "PodFailed"
    assert condition(finished, "Ready")["reason"] == "PodFailed"
    time.sleep(1)
    pod = k8s.get(PODS, namespace, "oneshot")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def _with_volume(body: dict, name: str) -> dict:
    body["spec"]["podTemplate"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "data", "mountPath": "/data"}
    ]
    body["spec"]["volumeClaimTemplates"] = [{
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }]  # fmt: skip
    return body


def test_pods_reach_each_other_by_pod_ip(k8s, namespace, node_agent):
    server = sandbox_body(
        "server",
        [
            "sh",
            "-c",
            "echo hello > /tmp/index.html && cd /tmp && "
            'exec python3 -m http.server 8000 --bind "$POD_IP"',
        ],
    )
    k8s.create(SANDBOXES, namespace, server)
    ip = ready(k8s, namespace, "server")["status"]["podIPs"][0]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    fetch = (
        "import time, urllib.request\n"
        "for _ in range(50):\n"
        "    try:\n"
        f"        body = urllib.request.urlopen('http://{ip}:8000/index.html', timeout=2).read()\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.2)\n"
        "open('/data/fetched', 'wb').write(body)\n"
    )
    client = _with_volume(sandbox_body("client", ["python3", "-c", fetch]), "client")
    client["spec"]["podTemplate"]["spec"]["restartPolicy"] = "Never"
    k8s.create(SANDBOXES, namespace, client)
    out = Path(node_agent.root) / "pvc" / namespace / "data-client" / "fetched"
    wait_for(lambda: out.exists() and out.read_bytes(), 60, "the client fetched from the server")
    assert out.read_bytes() == b"hello\n"


def test_pod_deletion_sends_sigterm_first(k8s, namespace, node_agent):
    command = [
        "sh",
        "-c",
        'trap "echo terminated > /data/signal; exit 0" TERM; while :; do sleep 0.1; done',
    ]
    k8s.create(SANDBOXES, namespace, _with_volume(sandbox_body("graceful", command), "graceful"))
    ready(k8s, namespace, "graceful")
    k8s.patch(SANDBOXES, namespace, "graceful", {"spec": {"operatingMode": "Suspended"}})
    wait_for(lambda: k8s.get(PODS, namespace, "graceful") is None, 60, "pod removed")
    signal_file = Path(node_agent.root) / "pvc" / namespace / "data-graceful" / "signal"
    assert signal_file.read_text() == "terminated\n"


def test_refused_volume_claim_is_a_reconciler_error(k8s, namespace):
    body = sandbox_body("novolume")
    body["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": {}}]
    k8s.create(SANDBOXES, namespace, body)
    sandbox = wait_condition(k8s, SANDBOXES, namespace, "novolume", "Ready",
                             reason="ReconcilerError", timeout=30)  # fmt: skip
    assert "PersistentVolumeClaim" in condition(sandbox, "Ready")["message"]
    assert k8s.get(PODS, namespace, "novolume") is None
