"""A stand-in kubelet for the test cluster (test support code, not part of the product).

There is no scheduler and no kubelet on the test cluster. This agent registers
one Node, binds every pending pod to it, and runs each pod's container as a
real local process inside this project's local sandbox runtimes (gVisor when
the pod's runtimeClassName says so, else bubblewrap):

* each pod gets its own IP from 127.0.0.0/8 and the host network, so a process
  that binds its pod IP is reachable from the other pods by that IP;
* PVC volumes are per-claim host directories that outlive the pod (``subPath``
  mounts a part of one); emptyDir volumes die with it; both belong to the uid pods
  run as (the sandbox uid, as a kubelet gives volumes to a pod's fsGroup);
* status is written the way the kubelet writes it (phase, conditions,
  containerStatuses, podIP/podIPs, hostIP, startTime), restarts follow
  restartPolicy; a tcpSocket readiness probe holds Ready back until its port
  answers (other probes are ignored);
* deletion: SIGTERM, the grace period, SIGKILL, then the pod is removed;
* environment: values, ``fieldRef`` (name, namespace, podIP, nodeName) and
  ``$(NAME)`` references to variables defined before, as the kubelet does;
  ``KUBERNETES_SERVICE_HOST``/``_PORT`` name the API server;
* API credentials: the ServiceAccount admission plugin is off on the test
  cluster, so a pod gets a token only when its spec says
  ``automountServiceAccountToken: true``; then, as the kubelet does, a token
  of its service account bound to the pod (TokenRequest API), the API
  server's CA and the namespace are mounted read-only at
  ``/var/run/secrets/kubernetes.io/serviceaccount``; ``secret`` volumes are
  the Secret's keys as read-only files.

Scheduling: a pod whose nodeSelector the node does not match, or that asks
for a resource it does not have (a GPU), stays Pending with PodScheduled
False/Unschedulable. Images are not pulled (one under the reserved domain
``.invalid`` waits in ErrImagePull): the command runs on the host's /usr and Python, with
this project's packages (as a kernel image has them installed). A
container without a command runs its args (an entrypoint that runs its
arguments, as Jupyter images' does), and with neither ``sleep infinity``.

    python -m testcluster.node_agent --kubeconfig F --root DIR [--ca-file CA]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes_asyncio import client, watch

import sandbox_provisioner
from agent_sandbox.kube import NODES, PODS, SECRETS, Kube, is_status, timestamp
from sandbox_provisioner import filesystem, identity, pyenv
from sandbox_provisioner.runtimes import Sandbox, create_runtime
from sandbox_provisioner.spec import NetworkMode, ResourceLimits, SandboxSpec

log = logging.getLogger("node-agent")
NODE = "sandbox-node"
NODE_LABELS = {"kubernetes.io/hostname": NODE}
#: What the node has: no GPU (a pod asking for one stays Pending, Unschedulable).
NODE_ALLOCATABLE = {"cpu": "2", "memory": "24Gi", "pods": "500"}
#: Images under this (reserved, RFC 2606) domain cannot be pulled: the container waits in
#: ErrImagePull, as the kubelet reports an image that does not exist.
UNPULLABLE = ".invalid/"
#: Where the kubelet mounts a pod's service account token.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_FIRST_IP = int(ipaddress.ip_address("127.1.0.1"))
#: Where this project's packages are: what a kernel image would have installed.
PACKAGES = Path(sandbox_provisioner.__file__).resolve().parent.parent


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    ip: str
    sandbox: Sandbox | None = None
    restarts: int = 0
    monitor: asyncio.Task | None = None
    probe: asyncio.Task | None = None
    stopping: bool = False
    started_at: str = field(default_factory=timestamp)


class NodeAgent:
    def __init__(self, kube: Kube, root: Path, node: str = NODE, ca_file: Path | None = None):
        self.kube, self.root, self.node = kube, root, node
        #: The API server's CA, given to pods with their service account token.
        self.ca_file = ca_file
        api_server = urlsplit(kube.api.configuration.host)
        self.api_host, self.api_port = api_server.hostname or "", api_server.port or 443
        self.runs: dict[str, PodRun] = {}
        self._next_ip = _FIRST_IP
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        #: Pods that stay Pending (unschedulable, image not pullable), already reported.
        self._stuck: set[str] = set()

    # -- the node ---------------------------------------------------------------------------
    async def register(self) -> None:
        body = {
            "metadata": {"name": self.node, "labels": NODE_LABELS},
            "status": {},
        }
        with contextlib.suppress(Exception):
            await self.kube.create(NODES, None, body)
        await self.kube.patch(
            NODES,
            None,
            self.node,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "lastHeartbeatTime": timestamp(),
                            "lastTransitionTime": timestamp(),
                        }
                    ],
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                    "capacity": NODE_ALLOCATABLE,
                    "allocatable": NODE_ALLOCATABLE,
                }
            },
            sub="status",
        )

    # -- the watch --------------------------------------------------------------------------
    async def run(self) -> None:
        await self.register()
        core = client.CoreV1Api(self.kube.api)
        version = ""
        while True:
            if not version:
                listing = await self.kube.call("GET", PODS.path())
                version = listing["metadata"]["resourceVersion"]
                for pod in listing.get("items", []):
                    self._dispatch("ADDED", pod)
            try:
                async for event in watch.Watch().stream(
                    core.list_pod_for_all_namespaces,
                    resource_version=version,
                    timeout_seconds=300,
                    allow_watch_bookmarks=True,
                ):
                    pod = self.kube.api.sanitize_for_serialization(event["object"])
                    version = pod["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._dispatch(event["type"], pod)
            except client.exceptions.ApiException as exc:
                if exc.status == 410:
                    version = ""  # too old: list again
                else:
                    log.warning("watch failed: %s", exc)
                    await asyncio.sleep(0.5)

    def _dispatch(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        lock = self._locks.setdefault(uid, asyncio.Lock())

        async def handle() -> None:
            async with lock:
                try:
                    await self._handle(kind, pod)
                except Exception:
                    log.exception(
                        "pod %s/%s", pod["metadata"]["namespace"], pod["metadata"]["name"]
                    )

        task = asyncio.create_task(handle())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if kind == "DELETED":
            await self._stop(uid, grace=0)
            self._locks.pop(uid, None)
            self._stuck.discard(uid)
            return
        if meta.get("deletionTimestamp"):
            if spec.get("nodeName") == self.node:
                await self._stop(uid, grace=meta.get("deletionGracePeriodSeconds") or 0)
                await self.kube.delete(PODS, meta["namespace"], meta["name"], uid=uid, grace=0)
            return
        if uid in self._stuck:  # reported once; its own status update comes back here
            return
        if not spec.get("nodeName"):
            reason = self._unschedulable(pod)
            if reason:  # as the scheduler says it, and the pod stays Pending
                self._stuck.add(uid)
                status = {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": reason, "lastTransitionTime": timestamp()}]}  # fmt: skip
                await self.kube.patch(PODS, meta["namespace"], meta["name"], {"status": status},
                                      sub="status")  # fmt: skip
                return
            await self._bind(pod)
            return
        if spec["nodeName"] == self.node and uid not in self.runs:
            phase = (pod.get("status") or {}).get("phase")
            if phase not in ("Succeeded", "Failed"):
                await self._start(pod)

    def _unschedulable(self, pod: dict[str, Any]) -> str | None:
        """Why no node fits ``pod``: a nodeSelector this node does not match, or an
        extended resource (``nvidia.com/gpu``) it does not have; None when it fits."""
        spec = pod["spec"]
        for key, value in (spec.get("nodeSelector") or {}).items():
            if NODE_LABELS.get(key) != value:
                return "0/1 nodes are available: 1 node(s) didn't match Pod's node selector."
        for container in spec["containers"]:
            resources = container.get("resources") or {}
            for name in {**(resources.get("requests") or {}), **(resources.get("limits") or {})}:
                if "/" in name and name not in NODE_ALLOCATABLE:
                    return f"0/1 nodes are available: 1 Insufficient {name}."
        return None

    async def _bind(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            await self.kube.call(
                "POST",
                PODS.path(meta["namespace"], meta["name"], "binding"),
                body={
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": meta["name"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                },
            )
        except Exception as exc:
            if not is_status(exc, 409, 404):
                raise

    # -- running a pod ----------------------------------------------------------------------
    def _allocate_ip(self) -> str:
        ip = str(ipaddress.ip_address(self._next_ip))
        self._next_ip += 1
        return ip

    async def _volumes(self, pod: dict[str, Any]) -> list[filesystem.ExtraMount]:
        meta, spec = pod["metadata"], pod["spec"]
        pod_dir = self.root / "pods" / meta["uid"]
        sources: dict[str, Path] = {}
        read_only: set[str] = set()
        for volume in spec.get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                sources[name] = self.root / "pvc" / meta["namespace"] / claim
            elif "emptyDir" in volume:
                sources[name] = pod_dir / "empty" / name
            elif "secret" in volume:
                sources[name] = await self._secret_volume(
                    meta["namespace"], volume["secret"], pod_dir / "secrets" / name
                )
                read_only.add(name)
        mounts = []
        container = spec["containers"][0]
        for vm in container.get("volumeMounts") or []:
            src = sources.get(vm["name"])
            if src is None:
                continue
            if vm.get("subPath"):  # a part of the volume, made if missing (as the kubelet does)
                src = src / vm["subPath"]
                src.mkdir(parents=True, exist_ok=True)
            writable = not vm.get("readOnly", False) and vm["name"] not in read_only
            if writable:
                _owned_by_pods(src)
            mounts.append(filesystem.ExtraMount(str(src), vm["mountPath"], writable))
        token = await self._service_account(pod, pod_dir / "serviceaccount")
        if token is not None:
            mounts.append(filesystem.ExtraMount(str(token), SERVICE_ACCOUNT_DIR, False))
        return mounts

    async def _secret_volume(self, namespace: str, source: dict[str, Any], into: Path) -> Path:
        """The Secret's keys (or the listed ``items``) as files of ``defaultMode``."""
        secret = await self.kube.get(SECRETS, namespace, source["secretName"])
        if secret is None:
            raise RuntimeError(f'MountVolume.SetUp failed: secret "{source["secretName"]}" '
                               "not found")  # fmt: skip
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        into.mkdir(parents=True, exist_ok=True)
        for item in items:
            target = into / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])
            target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
            _owned_by_pods(target)  # the kubelet gives them to the pod's fsGroup
        return into

    async def _service_account(self, pod: dict[str, Any], into: Path) -> Path | None:
        """A token of the pod's service account, bound to the pod, with CA and namespace."""
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("automountServiceAccountToken") is not True:
            return None
        account = spec.get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        answer = await self.kube.call(
            "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
            body=request,
        )  # fmt: skip
        into.mkdir(parents=True, exist_ok=True)
        (into / "token").write_text(answer["status"]["token"])
        (into / "namespace").write_text(meta["namespace"])
        if self.ca_file is not None:
            shutil.copyfile(self.ca_file, into / "ca.crt")
        for entry in into.iterdir():
            entry.chmod(0o644)
        return into

    async def _launch(self, pod: dict[str, Any], run: PodRun) -> Sandbox:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        # No command: the image's entrypoint, which (as Jupyter images' does) runs the args.
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        argv = argv or ["sleep", "infinity"]
        if not argv[0].startswith("/"):
            argv[0] = (
                shutil.which(argv[0], path=f"{Path(sys.executable).parent}:/usr/bin:/bin")
                or argv[0]
            )
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(PACKAGES),
            "HOME": "/tmp",
            "HOSTNAME": meta["name"],
            "POD_NAME": meta["name"],
            "POD_NAMESPACE": meta["namespace"],
            "POD_IP": run.ip,
            "KUBERNETES_SERVICE_HOST": self.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
        }
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "status.podIP": run.ip, "spec.nodeName": self.node}  # fmt: skip
        for var in container.get("env") or []:
            ref = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            value = fields.get(ref, "") if ref else var.get("value", "")
            env[var["name"]] = _expand(value, env)
        state = self.root / "pods" / meta["uid"] / f"run-{run.restarts}"
        state.mkdir(parents=True, exist_ok=True)
        workdir = container.get("workingDir")
        mounts = filesystem.build_mounts(
            python_paths=[*pyenv.python_dirs(sys.executable), str(PACKAGES)],
            workspace=None,
            workspace_writable=True,
            scratch_dir=str(self.root / "pods" / meta["uid"] / "scratch"),
            ipc_dir=None,
            connection_file=None,
            etc_mounts=filesystem.synthetic_etc(state / "etc", meta["name"], 0, 0),
            extra=await self._volumes(pod),
            hidden_paths=(),
        )
        _owned_by_pods(self.root / "pods" / meta["uid"] / "scratch")
        runtime_name = "gvisor" if spec.get("runtimeClassName") == "gvisor" else "bubblewrap"
        runtime = create_runtime(runtime_name)
        return await runtime.launch(
            SandboxSpec(
                kernel_id=f"pod-{meta['uid']}-{run.restarts}",
                argv=argv,
                env=env,
                cwd=workdir or filesystem.SCRATCH_TARGET,
                mounts=mounts,
                network=NetworkMode.HOST,
                limits=ResourceLimits(),
                state_dir=state,
                log_path=state / "container.log",
                hostname=meta["name"][:63],
            )
        )

    async def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        if UNPULLABLE in container.get("image", ""):
            self._stuck.add(meta["uid"])
            waiting = {"reason": "ErrImagePull", "message": f"rpc error: pulling image "
                       f"\"{container['image']}\": not found"}  # fmt: skip
            status = {"phase": "Pending", "containerStatuses": [{
                "name": container["name"], "image": container["image"], "imageID": "",
                "ready": False, "restartCount": 0, "state": {"waiting": waiting}}]}  # fmt: skip
            await self.kube.patch(PODS, meta["namespace"], meta["name"], {"status": status},
                                  sub="status")  # fmt: skip
            return
        run = PodRun(meta["uid"], meta["namespace"], meta["name"], self._allocate_ip())
        self.runs[run.uid] = run
        try:
            run.sandbox = await self._launch(pod, run)
        except Exception as exc:
            await self._write_status(run, pod, failed=str(exc))
            return
        await self._report_running(run, pod)
        run.monitor = asyncio.create_task(self._monitor(run, pod))

    async def _report_running(self, run: PodRun, pod: dict[str, Any]) -> None:
        """Running; Ready at once, or once a tcpSocket readiness probe's port answers."""
        port = _probe_port(pod["spec"]["containers"][0])
        await self._write_status(run, pod, ready=port is None)
        if port is not None:
            run.probe = asyncio.create_task(self._probe(run, pod, port))

    async def _probe(self, run: PodRun, pod: dict[str, Any], port: int) -> None:
        # Every 50 ms, not periodSeconds: tests and benchmarks should not wait on the probe.
        while not run.stopping:
            try:
                _, writer = await asyncio.open_connection(run.ip, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await self._write_status(run, pod, ready=True)
            return

    async def _monitor(self, run: PodRun, pod: dict[str, Any]) -> None:
        policy = pod["spec"].get("restartPolicy", "Always")
        while True:
            assert run.sandbox is not None
            code = await run.sandbox.wait()
            await run.sandbox.cleanup()
            if run.stopping:
                return
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                run.restarts += 1
                await asyncio.sleep(min(0.1 * 2**run.restarts, 10))
                if run.stopping:
                    return
                run.sandbox = await self._launch(pod, run)
                await self._report_running(run, pod)
                continue
            await self._write_status(run, pod, exit_code=code or 0)
            return

    async def _stop(self, uid: str, grace: float) -> None:
        run = self.runs.pop(uid, None)
        if run is None or run.sandbox is None:
            return
        run.stopping = True
        if await run.sandbox.poll() is None:
            await run.sandbox.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(run.sandbox.wait(), timeout=max(grace, 0.1))
            except TimeoutError:
                await run.sandbox.kill()
        await run.sandbox.cleanup()
        for task in (run.monitor, run.probe):
            if task is not None:
                task.cancel()
        # The containers' output outlives the pod, for whoever debugs a test.
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        for log_file in (self.root / "pods" / uid).glob("run-*/container.log"):
            shutil.copyfile(log_file, logs / f"{run.namespace}_{run.name}_{uid}_"
                            f"{log_file.parent.name}.log")  # fmt: skip
        shutil.rmtree(self.root / "pods" / uid, ignore_errors=True)

    async def _write_status(
        self,
        run: PodRun,
        pod: dict[str, Any],
        *,
        exit_code: int | None = None,
        failed: str = "",
        ready: bool = True,
    ) -> None:
        container = pod["spec"]["containers"][0]
        now = timestamp()
        running = exit_code is None and not failed
        if running:
            state = {"running": {"startedAt": now}}
            phase = "Running"
        else:
            state = {
                "terminated": {
                    "exitCode": exit_code if exit_code is not None else 128,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    "message": failed,
                    "finishedAt": now,
                }
            }
            phase = "Succeeded" if exit_code == 0 else "Failed"
        ready_text = "True" if running and ready else "False"
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": run.started_at},
                {"type": "Initialized", "status": "True", "lastTransitionTime": run.started_at},
                {"type": "ContainersReady", "status": ready_text, "lastTransitionTime": now},
                {"type": "Ready", "status": ready_text, "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "containerID": f"sandbox://{run.uid}",
                    "ready": running and ready,
                    "started": running,
                    "restartCount": run.restarts,
                    "state": state,
                }
            ],
        }
        try:
            await self.kube.patch(PODS, run.namespace, run.name, {"status": status}, sub="status")
        except Exception as exc:
            if not is_status(exc, 404):
                raise

    async def close(self) -> None:
        await asyncio.gather(
            *(self._stop(uid, 0) for uid in list(self.runs)), return_exceptions=True
        )


def _expand(value: str, env: dict[str, str]) -> str:
    """``$(NAME)`` of a variable defined before, as the kubelet expands it (``$$`` escapes)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def _probe_port(container: dict[str, Any]) -> int | None:
    """The port of a tcpSocket readiness probe (a number or a named container port)."""
    port = ((container.get("readinessProbe") or {}).get("tcpSocket") or {}).get("port")
    if isinstance(port, str) and not port.isdigit():
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        port = named.get(port)
    return int(port) if port is not None else None


async def main_async(kubeconfig: str, root: Path, ca_file: Path | None = None) -> None:
    kube = await Kube.connect(kubeconfig)
    agent = NodeAgent(kube, root, ca_file=ca_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(agent.run())
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await agent.close()
    await kube.close()


def _owned_by_pods(path: Path) -> None:
    """A volume directory (made if missing) or file, owned by the uid pods run as."""
    if not path.exists():
        path.mkdir(parents=True)
    who = identity.resolve()
    if who.separate and path.stat().st_uid != who.uid:
        os.chown(path, who.uid, who.gid)


def main() -> None:
    parser = argparse.ArgumentParser(description="stand-in kubelet for the test cluster")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--ca-file", type=Path, help="the API server's CA, for pods' tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node-agent %(message)s")
    asyncio.run(main_async(args.kubeconfig, args.root, args.ca_file))


if __name__ == "__main__":
    main()
