"""Preparations on Kubernetes: each one a pod, in the cluster's sandbox runtime class.

On a Hub on Kubernetes the prepared commits live on a volume (a ReadWriteMany
PVC) that the Hub service, preparation pods and users' servers all mount. The
service fetches the repository and writes the plan there (as on one machine);
:class:`PodRunner` then runs :mod:`.inside` in a pod that

* runs in the deployment's sandbox runtime class (gVisor by default), as an
  unprivileged uid with no capability, no service account token and no service
  links, with memory, CPU and ephemeral storage limits and a deadline;
* sees only its own part of the volume (``subPath``): the repository at
  ``/home/jovyan``, the environment's prefix at ``/srv/binder``, the plan
  (read-only) and its log;
* reaches the network only through the service's proxy
  (:class:`~.egress.SharedEgressProxy`), with a token that holds it to this
  preparation's allowlist; the NetworkPolicy in
  ``jupyter_config/kubernetes/binder.yaml`` lets preparation pods reach that port
  and nothing else.

The service reads the log from the volume as it grows (a pod's log through the API
needs a kubelet; the volume works everywhere) and watches the pod's phase. The log's
directory is the pod's to write: the service reads the file it first opened there,
never a link the pod puts in its place (:class:`~.untrusted.LogTail`), and takes in what
the pod prepared as the local preparer does, by descriptor (:mod:`.seal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .egress import Allowlist, SharedEgressProxy

#: Preparation pods carry this label (the NetworkPolicy selects them by it).
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "binder-prepare"
_LOG_DIR = "/var/log/binder"


def preparation_pod(name: str, *, image: str, claim: str, work: str, runtime_class: str | None,
                    uid: int, memory_bytes: int, cpus: float, deadline: float,
                    command: list[str]) -> dict[str, Any]:  # fmt: skip
    """The pod of one preparation; ``work``: its directory on the volume (``claim``)."""

    def on_volume(sub: str, path: str, read_only: bool = False) -> dict[str, Any]:
        return {"name": "cache", "mountPath": path, "subPath": f"{work}/{sub}",
                "readOnly": read_only}  # fmt: skip

    limits: dict[str, str] = {"ephemeral-storage": "1Gi"}
    if memory_bytes:
        limits["memory"] = str(memory_bytes)
    if cpus:
        limits["cpu"] = f"{int(cpus * 1000)}m"
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "activeDeadlineSeconds": int(deadline),
        "securityContext": {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                            "runAsNonRoot": True},
        "containers": [{
            "name": "prepare",
            "image": image,
            "command": command,
            "workingDir": "/home/jovyan",
            "resources": {"limits": limits, "requests": dict(limits)},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [
                on_volume("repo", "/home/jovyan"),
                on_volume("env", "/srv/binder"),
                on_volume("plan", "/run/jupyter-sandbox-build", read_only=True),
                on_volume("log", _LOG_DIR),
            ],
        }],
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": claim}}],
    }
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    return {"metadata": {"name": name, "labels": {COMPONENT_LABEL: COMPONENT}}, "spec": spec}


class PodHandle:
    """A preparation pod, as the preparer watches a sandbox: wait, kill, clean up."""

    def __init__(self, kube: Any, namespace: str, name: str):
        self.kube, self.namespace, self.name = kube, namespace, name

    async def wait(self) -> int | None:
        from agent_sandbox.kube import PODS

        while True:
            pod = await self.kube.get(PODS, self.namespace, self.name)
            if pod is None:
                return None
            status = pod.get("status") or {}
            if status.get("phase") in ("Succeeded", "Failed"):
                for container in status.get("containerStatuses") or []:
                    done = (container.get("state") or {}).get("terminated")
                    if done is not None:
                        return int(done.get("exitCode", 1))
                return 0 if status["phase"] == "Succeeded" else 1
            await asyncio.sleep(0.5)

    async def kill(self) -> None:
        await self.cleanup(grace=0)

    async def cleanup(self, grace: int = 5) -> None:
        from agent_sandbox.kube import PODS

        with contextlib.suppress(Exception):
            await self.kube.delete(PODS, self.namespace, self.name, grace=grace)


@dataclass
class PodRunner:
    """Runs preparations as pods in ``namespace``, the cache being the PVC ``claim``."""

    namespace: str
    claim: str
    image: str
    proxy: SharedEgressProxy
    #: Where pods reach the proxy (``host:port``: the Hub pod's IP and the proxy's port).
    proxy_address: str
    runtime_class: str | None = "gvisor"
    uid: int = 1000
    python: str = "python3"
    kube: Any = None
    #: Where the proxy listens (in the Hub service's pod).
    listen: tuple[str, int] = ("0.0.0.0", 8899)

    async def start(self) -> None:
        await self.proxy.start_tcp(*self.listen)

    async def run(self, preparer: Any, work: Path, plan: dict[str, Any], allow: Allowlist,
                  emit: Any) -> tuple[int | None, list[str]]:  # fmt: skip
        """Run the plan in a pod; its exit code, and what the proxy refused it."""
        if self.kube is None:
            from agent_sandbox.kube import Kube

            self.kube = await Kube.connect()
        from agent_sandbox.kube import PODS

        token, denied = self.proxy.register(allow)
        (work / "log").mkdir(mode=0o777, exist_ok=True)
        (work / "log").chmod(0o777)  # the pod's uid writes its log there
        for sub in ("repo", "env"):
            (work / sub).chmod(0o777)  # and prepares there (sealed again afterwards)
        plan = {**plan, "proxy_url": f"http://binder:{token}@{self.proxy_address}",
                "log": f"{_LOG_DIR}/build.log"}  # fmt: skip
        (work / "plan" / "plan.json").write_text(json.dumps(plan))
        name = f"binder-prepare-{secrets.token_hex(5)}"
        limits = preparer.limits
        pod = preparation_pod(
            name, image=self.image, claim=self.claim,
            work=str(work.relative_to(preparer.cache_root)), runtime_class=self.runtime_class,
            uid=self.uid, memory_bytes=limits.memory_bytes, cpus=limits.cpus,
            deadline=limits.timeout,
            command=[self.python, "-m", "sandbox_spawner.binder.inside",
                     "/run/jupyter-sandbox-build/plan.json"],
        )  # fmt: skip
        await self.kube.create(PODS, self.namespace, pod)
        handle = PodHandle(self.kube, self.namespace, name)
        emit("building", f"Preparing in the pod {name} (runtime class "
             f"{self.runtime_class or 'the default'}; network: {', '.join(allow.entries)} only)")
        try:
            code = await preparer.watch(handle, work / "log" / "build.log", work, emit)
        finally:
            await handle.cleanup()
            self.proxy.unregister(token)
        return code, denied
