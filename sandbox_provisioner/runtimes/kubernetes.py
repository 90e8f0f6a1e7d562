"""The Kubernetes runtime: each kernel in a Sandbox claimed from a warm pool.

A kernel start creates a ``SandboxClaim`` against the ``SandboxWarmPool``
named by ``warm_pool`` (one pool per tier: gVisor for untrusted code, Kata
with a GPU for ML), waits until it is Ready and reads ``status.sandbox``: the
Sandbox's name (an adopted one keeps the pool's name) and its pod IP. The
pod's main process is the kernel agent (:mod:`sandbox_provisioner.agent`),
which has ipykernel imported already; this runtime claims it with the
controller key, hands it the kernel's environment and arguments, and points
ZMQ at the pod IP. Nothing per kernel goes through the claim, so every claim
can take a warm sandbox.

Restarts happen in place (the agent forks a new kernel in the same sandbox);
shutdown deletes the claim, and the controller deletes the Sandbox with it.
Claims carry the kernel id, user and server as labels; a server that starts
again deletes the claims its crashed predecessor left behind (:func:`sweep`).
Only the Agent Sandbox API is used, so any conforming controller will do.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jupyter_core.paths import jupyter_data_dir
from traitlets import Float, Int, Unicode, default

from agent_sandbox import api

from ..errors import SandboxError
from ..spec import SandboxSpec
from .agent_driven import AgentDrivenSandbox
from .base import Availability, Sandbox, SandboxRuntime

if TYPE_CHECKING:
    from agent_sandbox.kube import Kube

    from ..agent.client import AgentClient

#: Claim reasons that will not get better by waiting.
FATAL_REASONS = {
    api.Reason.TEMPLATE_NOT_FOUND,
    api.Reason.WARM_POOL_NOT_FOUND,
    api.Reason.INVALID_METADATA,
    api.Reason.ENV_VARS_INJECTION_REJECTED,
    api.Reason.VOLUME_CLAIM_TEMPLATES_ERROR,
    api.Reason.CLAIM_EXPIRED,
    api.Reason.SANDBOX_EXPIRED,
}
_IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: Where the controller key is, when not in the Jupyter data directory.
CONTROLLER_KEY_FILE_ENV = "JUPYTER_SANDBOX_CONTROLLER_KEY_FILE"


def hub_server_id(user: str, server_name: str = "") -> str:
    """The server id of a Hub user's server, which its kernels' claims carry: no two
    (user, server) pairs have one ("a-b" and "a", "b-c" did), as a server's stop and start
    delete the claims labelled with its id."""
    return f"hub/{quote(user, safe='')}/{quote(server_name, safe='')}"


def server_selector(server_id: str) -> str:
    """A label selector for the claims of the kernels of one server, and only of it."""
    return f"{api.LABEL_KERNEL_SERVER}={api.unique_label_value(server_id)}"


class ClaimFailed(SandboxError):
    """The claim did not become a usable sandbox; the message says why."""


def _claims() -> Any:
    from agent_sandbox.kube import custom

    return custom(api.SANDBOX_CLAIM)


class KubernetesRuntime(SandboxRuntime):
    name = "kubernetes"
    description = "a Sandbox claimed from a warm pool on a Kubernetes cluster"
    strength = 0
    local = False

    warm_pool = Unicode("", config=True, help="The SandboxWarmPool to claim kernels from.")
    namespace = Unicode(config=True, help="Namespace of the pool and the claims.")
    kubeconfig = Unicode("", config=True, help="Kubeconfig file; default $KUBECONFIG, "
                         "~/.kube/config, else the pod's service account.")  # fmt: skip
    agent_port = Int(8900, config=True, help="The kernel agent's port in the sandbox.")
    controller_key_file = Unicode(
        config=True,
        help="This server's Ed25519 controller key (PEM; made on first use). Its public half "
        "(`jupyter sandbox controller-key`) must be pinned in the pool's template.",
    )
    ready_timeout = Float(120.0, config=True, help="Seconds for a claim to become Ready.")
    server_id = Unicode(
        config=True, help="Names this notebook server on its claims (label), for the sweep."
    )

    @default("namespace")
    def _default_namespace(self) -> str:
        if os.environ.get("JUPYTER_SANDBOX_NAMESPACE"):
            return os.environ["JUPYTER_SANDBOX_NAMESPACE"]
        try:
            with open(_IN_CLUSTER_NAMESPACE) as f:
                return f.read().strip()
        except OSError:
            return "default"

    @default("controller_key_file")
    def _default_key_file(self) -> str:
        # A Hub's servers share one key, mounted from a Secret (see jupyter_config/kubernetes).
        return os.environ.get(CONTROLLER_KEY_FILE_ENV) or os.path.join(
            jupyter_data_dir(), "sandbox", "controller-ed25519.pem"
        )

    @default("server_id")
    def _default_server_id(self) -> str:
        hub = os.environ.get("JUPYTERHUB_USER")
        if hub:
            return hub_server_id(hub, os.environ.get("JUPYTERHUB_SERVER_NAME", ""))
        return socket.gethostname()

    def availability(self) -> Availability:
        if not self.warm_pool:
            return Availability(
                False, "no warm pool is configured", "set warm_pool in the kernelspec's config"
            )
        try:
            import kubernetes_asyncio  # noqa: F401
        except ImportError:
            return Availability(False, "kubernetes_asyncio is missing",
                                "pip install 'jupyter-sandbox[kubernetes]'")  # fmt: skip
        return Availability(True, f"warm pool {self.namespace}/{self.warm_pool}")

    # -- launch -----------------------------------------------------------------------------
    async def launch(self, spec: SandboxSpec) -> Sandbox:
        from ..agent.protocol import load_or_create_signing_key

        key = load_or_create_signing_key(self.controller_key_file)
        sandbox = ClaimedSandbox(self, self.namespace)
        try:
            kube = await sandbox.kube()
            await sweep_once(kube, self.namespace, self.server_id, self.log)
            claim = await kube.create(_claims(), self.namespace, self._claim_body(spec))
            sandbox.claim = claim["metadata"]["name"]
            _LIVE_CLAIMS.add(sandbox.claim)
            status = await self._wait_ready(kube, sandbox.claim)
            sandbox.sandbox_name = status["name"]
            sandbox.ip = status["podIPs"][0]
            sandbox.warm = sandbox.sandbox_name != sandbox.claim
            sandbox.agent = await self._claim_agent(sandbox.ip, key)
            sandbox.session = sandbox.agent.session
            await sandbox.start_kernel(spec)
        except BaseException:
            await sandbox.cleanup()
            raise
        return sandbox

    def _claim_body(self, spec: SandboxSpec) -> dict[str, Any]:
        kernel_id = spec.kernel_id
        user = spec.env.get("JUPYTERHUB_USER") or os.environ.get("JUPYTERHUB_USER") or _user()
        labels = {
            api.LABEL_KERNEL_ID: api.label_value(kernel_id),
            api.LABEL_KERNEL_USER: api.label_value(user),
            api.LABEL_KERNEL_SERVER: api.unique_label_value(self.server_id),
        }
        return {
            "apiVersion": api.SANDBOX_CLAIM.api_version,
            "kind": api.SANDBOX_CLAIM.kind,
            "metadata": {
                "generateName": f"kernel-{_name_part(user)}-",
                "labels": labels,
                # Labels are cut to 63 safe characters; the annotations keep the whole value.
                "annotations": {
                    api.LABEL_KERNEL_USER: user,
                    api.LABEL_KERNEL_SERVER: self.server_id,
                    api.ANNOTATION_SERVER_RUN: _RUN_ID,
                },
            },
            "spec": {
                "warmPoolRef": {"name": self.warm_pool},
                # Labels only: upstream takes a cold sandbox for claims that inject env.
                "additionalPodMetadata": {
                    "labels": {
                        api.POD_LABEL_KERNEL_ID: api.label_value(kernel_id),
                        api.POD_LABEL_KERNEL_USER: api.label_value(user),
                    }
                },
            },
        }

    async def _wait_ready(self, kube: Kube, claim: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        delay, last = 0.02, "no status yet"
        while True:
            obj = await kube.get(_claims(), self.namespace, claim)
            if obj is None:
                raise ClaimFailed(f"claim {self.namespace}/{claim} was deleted while starting")
            status = obj.get("status") or {}
            for cond in status.get("conditions") or []:
                if cond.get("type") != api.ConditionType.READY:
                    continue
                last = f"{cond.get('reason')}: {cond.get('message', '')}"
                sandbox = status.get("sandbox") or {}
                if cond.get("status") == "True" and sandbox.get("podIPs"):
                    return sandbox
                if cond.get("reason") in FATAL_REASONS:
                    raise ClaimFailed(
                        f"claim {self.namespace}/{claim} on warm pool {self.warm_pool!r} "
                        f"failed: {last}"
                    )
            if loop.time() > deadline:
                raise ClaimFailed(
                    f"claim {self.namespace}/{claim} on warm pool {self.warm_pool!r} was not "
                    f"Ready within ready_timeout={self.ready_timeout:g}s ({last})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def _claim_agent(self, ip: str, key: Any) -> AgentClient:
        """Claim the sandbox's agent; it may still be starting (a cold sandbox)."""
        from ..agent.client import AgentClient

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while True:
            try:
                return await AgentClient.claim((ip, self.agent_port), key)
            except (ConnectionError, OSError, TimeoutError):
                if loop.time() > deadline:
                    raise ClaimFailed(
                        f"the kernel agent at {ip}:{self.agent_port} did not answer within "
                        f"ready_timeout={self.ready_timeout:g}s"
                    ) from None
                await asyncio.sleep(0.05)

    def reattach(self, info: dict[str, Any]) -> Sandbox:
        sandbox = ClaimedSandbox(self, info["namespace"])
        sandbox.agent_port = int(info["agent_port"])
        sandbox.claim, sandbox.sandbox_name = info["claim"], info["sandbox"]
        sandbox.ip, sandbox.warm = info["ip"], bool(info.get("warm"))
        sandbox.session = base64.b64decode(info["session"])
        sandbox.connection = info.get("connection")
        _LIVE_CLAIMS.add(info["claim"])
        return sandbox


class ClaimedSandbox(AgentDrivenSandbox):
    """A kernel in a claimed Sandbox, driven through its agent."""

    def __init__(self, runtime: KubernetesRuntime, namespace: str):
        super().__init__(runtime.log)
        self.runtime, self.namespace = runtime, namespace
        self.agent_port = runtime.agent_port
        self.claim: str | None = None
        self.sandbox_name = self.ip = ""
        self._kube: Kube | None = None

    async def kube(self) -> Kube:
        if self._kube is None:
            from agent_sandbox.kube import Kube

            self._kube = await Kube.connect(self.runtime.kubeconfig or None)
        return self._kube

    async def connect(self) -> AgentClient:
        from ..agent.client import AgentClient

        assert self.session is not None
        return await AgentClient.resume((self.ip, self.agent_port), self.session)

    def describe(self) -> str:
        return f"kubernetes, pool {self.runtime.warm_pool}"

    async def cleanup(self) -> None:
        """Delete the claim: the controller deletes the Sandbox and its pod with it."""
        self.drop_agent()
        try:
            if self.claim is not None:
                _LIVE_CLAIMS.discard(self.claim)
                await (await self.kube()).delete(_claims(), self.namespace, self.claim)
        finally:
            self.claim = None
            kube, self._kube = self._kube, None
            if kube is not None:
                await kube.close()

    def info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "claim": self.claim,
            "sandbox": self.sandbox_name,
            "ip": self.ip,
            "agent_port": self.agent_port,
            "warm": self.warm,
            "session": base64.b64encode(self.session or b"").decode(),
            "connection": self.connection,
        }


#: Claims of kernels this process runs or took over: the sweep leaves them alone.
_LIVE_CLAIMS: set[str] = set()
_SWEPT: set[tuple[str, str]] = set()
#: This process's run of its server, on every claim it makes: a later run sweeps them.
_RUN_ID = secrets.token_hex(8)


async def sweep_once(kube: Kube, namespace: str, server_id: str, log: Any) -> list[str]:
    """Once per process: delete this server's claims that no kernel here owns (a crash's)."""
    key = (namespace, server_id)
    if key in _SWEPT:
        return []
    _SWEPT.add(key)
    return await sweep(kube, namespace, server_id, log)


async def sweep(kube: Kube, namespace: str, server_id: str, log: Any) -> list[str]:
    """Delete claims labelled with ``server_id`` that another run of it made (they carry
    its run id), unless a kernel of this process owns them (one it reconnected to through
    its provisioner info). By run id, not by time: a claim's creation time is the API
    server's, to the second, and a run's start is this machine's."""
    deleted = []
    for claim in await kube.list(_claims(), namespace, labels=server_selector(server_id)):
        meta = claim["metadata"]
        run = (meta.get("annotations") or {}).get(api.ANNOTATION_SERVER_RUN)
        if meta["name"] in _LIVE_CLAIMS or meta.get("deletionTimestamp") or run == _RUN_ID:
            continue
        log.warning("Deleting claim %s/%s (kernel %s): left behind by an earlier run of this "
                    "server", namespace, meta["name"],
                    (meta.get("labels") or {}).get(api.LABEL_KERNEL_ID))  # fmt: skip
        if await kube.delete(_claims(), namespace, meta["name"]):
            deleted.append(meta["name"])
    return deleted


def _name_part(text: str) -> str:
    """``text`` as part of an object name (lowercase RFC 1123), at most 20 characters."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:20].strip("-")
    return cleaned or "user"


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
