"""SandboxSpawner: each Hub user's server in a persistent Sandbox that hibernates.

A KubeSpawner whose pod lives in a ``Sandbox`` (``agents.x-k8s.io``) instead of
a bare Pod. Everything an administrator configures on KubeSpawner still
applies (``profile_list`` with ``kubespawner_override``, image, resources,
volumes, storage, namespaces, ``modify_pod_hook``): its pod manifest becomes
the Sandbox's pod template and its PVC the Sandbox's home claim template
(:mod:`.manifests`). The Sandbox's name is KubeSpawner's ``pod_name``, stable
per user and server, and so is its headless Service's.

* ``start`` creates the Sandbox, or resumes it (``operatingMode: Running``,
  today's pod template); it returns the server's URL once the Sandbox's pod
  runs and the server answers, and fails at once, with the reason on the spawn page, when it cannot
  become Ready: the controller's ``ReconcilerError`` (a missing RuntimeClass,
  a refused pod), an image that cannot be pulled, an unschedulable pod, a
  SandboxTemplate that does not exist.
* ``stop`` hibernates: ``operatingMode: Suspended``; the pod goes, the
  Sandbox and the home PVC stay, and ``will_resume`` keeps the server's token.
  Kernels the server ran in Sandboxes of their own (the per-kernel profile)
  go with it: their claims are deleted if the server did not end them.
* ``delete_forever`` (the user or named server is deleted) deletes the
  Sandbox; its home PVC, which it owns, goes with it.
* ``poll`` and ``get_state``/``load_state`` go by the Sandbox, so a Hub
  restart finds every user's sandbox, running or hibernated, and disturbs no
  pod.

The Sandbox controller (this project's, ``agent_sandbox``, or upstream's) must
run in the cluster: the Hub service ``sandbox_spawner.service`` runs it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jupyterhub.utils import maybe_future
from kubernetes_asyncio.client.rest import ApiException
from kubespawner import KubeSpawner
from traitlets import Bool, Float, Unicode, default

from agent_sandbox import api
from agent_sandbox.kube import CLAIMS, JSON_PATCH, SANDBOXES, TEMPLATES, Kube, is_status
from sandbox_provisioner.runtimes.kubernetes import hub_server_id, server_selector

from . import manifests
from .activity import ActivityKey
from .binder import server as binder_server
from .starts import RecordsStarts


class SpawnFailed(RuntimeError):
    """The Sandbox cannot become Ready; the message says why (it reaches the spawn page)."""


class SandboxSpawner(RecordsStarts, ActivityKey, KubeSpawner):
    """KubeSpawner's configuration, each server in a hibernating Sandbox."""

    sandbox_template = Unicode(
        "", config=True,
        help="A SandboxTemplate (in the server's namespace) whose pod template is the base "
        "of every server's: the server's container, volumes and metadata join it. Empty: "
        "KubeSpawner's pod manifest alone.",
    )  # fmt: skip
    hibernate_timeout = Float(
        120, config=True, help="Seconds for a hibernating server's pod to go."
    )
    delete_home_on_user_delete = Bool(
        True, config=True,
        help="Delete the Sandbox, and with it the home PVC, when the user (or named server) "
        "is deleted. Off: the Sandbox stays, hibernated, for an administrator to remove.",
    )  # fmt: skip

    binder_cache = Unicode(
        "", config=True,
        help="Binder links: where the Hub sees the prepared commits' volume (the service's "
        "--binder-cache). Empty: launched repositories are refused.",
    )  # fmt: skip
    binder_cache_claim = Unicode(
        "jupyter-sandbox-binder-cache", config=True,
        help="Binder links: the PVC (ReadWriteMany) holding the prepared commits, which a "
        "launched repository's server mounts read-only.",
    )  # fmt: skip

    binder_home = Unicode(
        "/home/jovyan", config=True,
        help="Binder links: where the server's home volume is mounted; a launched "
        "repository's files are copied there on its first start, and the server runs there.",
    )  # fmt: skip

    @default("will_resume")
    def _default_will_resume(self) -> bool:
        return True  # a hibernated server keeps its API token

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        profile = (self.user_options or {}).get("profile")
        if isinstance(profile, str) and profile:
            # One of the profile list (KubeSpawner refuses a start with any other): the
            # hibernator's --exempt-profiles goes by this, not by what the user sent.
            state["profile"] = profile
        return state

    @property
    def sandbox_name(self) -> str:
        return self.pod_name

    @property
    def kube(self) -> Kube:
        """JSON access through KubeSpawner's shared client (its configuration)."""
        return Kube(api_client=self.api.api_client)

    # -- start --------------------------------------------------------------------------
    async def _start(self) -> str:
        began = time.monotonic()
        self.new_activity_key()
        await self.load_user_options()
        if self.enable_user_namespaces:
            await self._ensure_namespace()
        if getattr(self, "internal_ssl", False):
            raise SpawnFailed("internal_ssl is not supported by SandboxSpawner")
        await self._start_watching_pods()
        if self.events_enabled:
            await self._start_watching_events()
            events = self.events
            if events:
                self._last_event = events[-1]["metadata"]["uid"]
        self._notes: list[str] = []
        desired = await self._desired_sandbox()
        existing = await self.kube.get(SANDBOXES, self.namespace, self.sandbox_name)
        if existing is None:
            self._note(f"Creating Sandbox {self.namespace}/{self.sandbox_name}")
            try:
                await self.kube.create(SANDBOXES, self.namespace, desired)
            except ApiException as exc:
                raise SpawnFailed(f"the Sandbox was refused: {_message(exc)}") from None
        else:
            hibernated = manifests.is_suspended(existing)
            self._note(f"Resuming {'hibernated ' if hibernated else ''}Sandbox "
                       f"{self.namespace}/{self.sandbox_name}")  # fmt: skip
            patch = manifests.resume_patch(desired)
            await self.kube.patch(SANDBOXES, self.namespace, self.sandbox_name, patch,
                                  content_type=JSON_PATCH)  # fmt: skip
        self._pvc_exists = bool(desired["spec"].get("volumeClaimTemplates"))
        url = await self._wait_ready()
        self.record_start(began, resumed=existing is not None)
        return url

    async def _desired_sandbox(self) -> dict[str, Any]:
        serialize = self.api.api_client.sanitize_for_serialization
        pod = await self.get_pod_manifest()
        if self.modify_pod_hook:
            pod = await maybe_future(self.modify_pod_hook(self, pod))
        pvc = serialize(self.get_pvc_manifest()) if self.storage_pvc_ensure else None
        template = None
        if self.sandbox_template:
            template = await self.kube.get(TEMPLATES, self.namespace, self.sandbox_template)
            if template is None:
                raise SpawnFailed(f"SandboxTemplate {self.namespace}/{self.sandbox_template} "
                                  "does not exist")  # fmt: skip
        pod = serialize(pod)
        launched = self._binder_server()
        if launched is not None:
            pod = launched.kube_pod(pod, self.binder_cache_claim, self.binder_home)
        return manifests.sandbox_manifest(self.sandbox_name, pod, pvc, template)

    def _binder_server(self) -> binder_server.BinderServer | None:
        """The launched repository this server's options name (refused unless prepared)."""
        if binder_server.OPTION not in (self.user_options or {}):
            return None
        if not self.binder_cache:
            raise SpawnFailed("Binder links are not configured on this Hub (binder_cache)")
        try:
            return binder_server.from_user_options(self.user_options, Path(self.binder_cache))
        except binder_server.BadBinderOptions as exc:
            raise SpawnFailed(str(exc)) from None

    async def _wait_ready(self) -> str:
        """The server's URL once its pod runs; SpawnFailed as soon as it cannot.

        The pod comes from KubeSpawner's pod reflector (a watch), as KubeSpawner's own
        start waits for it: once the Sandbox's pod (owned by it) runs with every container
        ready and its server's port accepts a connection, the server is up, without
        waiting for the controller to write the Sandbox's Ready status. (The Hub checks
        the URL with a growing back-off; a URL returned before the port listens costs up
        to a back-off step.) The Sandbox is read twice a second for what only it says (the
        controller's errors) and for the spawn page.
        """
        deadline = time.monotonic() + self.start_timeout
        said, checked = "", 0.0
        key = f"{self.namespace}/{self.sandbox_name}"
        sandbox: dict[str, Any] | None = None
        while True:
            pod = self.pod_reflector.pods.get(key) if self.pod_reflector else None
            if time.monotonic() - checked > 0.5 or sandbox is None:
                sandbox = await self.kube.get(SANDBOXES, self.namespace, self.sandbox_name)
                checked = time.monotonic()
                failure = manifests.start_failure(sandbox, pod)
                if failure:
                    raise SpawnFailed(f"Sandbox {key}: {failure}")
                assert sandbox is not None
                state = manifests.describe(sandbox)
                if state != said:
                    self._note(state)
                    said = state
            if manifests.owns(sandbox, pod) and self.is_pod_running(pod):
                url = self._get_pod_url(pod)
                if await _answers(url):
                    return url
            if time.monotonic() > deadline:
                raise SpawnFailed(f"Sandbox {key} was not Ready within start_timeout="
                                  f"{self.start_timeout}s ({said})")  # fmt: skip
            await asyncio.sleep(0.05)

    def _url(self, sandbox: dict[str, Any]) -> str:
        status = sandbox.get("status") or {}
        host = status["podIPs"][0]  # the Sandbox's status lists the pod's IPs as strings
        if self.get_pod_url:
            return self.get_pod_url(self, {"status": {"podIP": host}})
        if self.services_enabled and status.get("serviceFQDN"):
            host = status["serviceFQDN"]
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _note(self, message: str) -> None:
        self.log.info("%s: %s", self._log_name, message)
        self._notes.append(message)

    # -- progress ---------------------------------------------------------------------------
    async def progress(self):
        """The Sandbox's conditions and the pod's Events, until the start ends."""
        if self.events_enabled:
            await self._start_watching_events()
        notes_seen = events_seen = 0
        progress = 0
        while True:
            done = self._start_future is not None and self._start_future.done()
            notes = getattr(self, "_notes", [])
            fresh = [(None, n) for n in notes[notes_seen:]]
            notes_seen = len(notes)
            if self.events_enabled:
                events = self.events
                fresh += [(e, f"[{e['type']}] {e['message']}") for e in events[events_seen:]]
                events_seen = len(events)
            for raw, message in fresh:
                progress += (90 - progress) / 3
                event: dict[str, Any] = {"progress": int(progress), "message": message}
                if raw is not None:
                    event["raw_event"] = raw
                yield event
            if done:
                return
            await asyncio.sleep(0.5)

    # -- stop, poll, delete -----------------------------------------------------------------
    async def stop(self, now: bool = False) -> None:
        """Hibernate: the pod goes; the Sandbox, the home PVC and the token stay."""
        patch = {"spec": {"operatingMode": api.OperatingMode.SUSPENDED.value}}
        try:
            await self.kube.patch(SANDBOXES, self.namespace, self.sandbox_name, patch)
        except ApiException as exc:
            if not is_status(exc, 404):
                raise
            return
        deadline = time.monotonic() + self.hibernate_timeout
        while time.monotonic() < deadline:
            sandbox = await self.kube.get(SANDBOXES, self.namespace, self.sandbox_name)
            if sandbox is None or manifests.is_suspended(sandbox):
                self.log.info("%s: hibernated", self._log_name)
                await self._end_kernels()
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the pod of Sandbox {self.namespace}/{self.sandbox_name} did not "
                           f"go within hibernate_timeout={self.hibernate_timeout}s")  # fmt: skip

    async def _end_kernels(self) -> None:
        """Delete the claims of this server's kernels (the per-kernel profile) that its
        server did not end itself: a stopped server leaves no kernel Sandbox running."""
        selector = server_selector(hub_server_id(self.user.name, self.name))
        for claim in await self.kube.list(CLAIMS, self.namespace, labels=selector):
            if await self.kube.delete(CLAIMS, self.namespace, claim["metadata"]["name"]):
                self.log.info("%s: deleted the claim %s of a kernel the server left",
                              self._log_name, claim["metadata"]["name"])  # fmt: skip

    async def poll(self) -> int | None:
        sandbox = await self.kube.get(SANDBOXES, self.namespace, self.sandbox_name)
        if sandbox is None:
            return 1
        if (sandbox.get("spec") or {}).get("operatingMode") == api.OperatingMode.SUSPENDED:
            return 0
        if manifests.is_ready(sandbox):
            self._follow_url(sandbox)
            return None
        if manifests.start_failure(sandbox, None):
            return 1
        return None  # starting, or its pod restarting

    def _follow_url(self, sandbox: dict[str, Any]) -> None:
        """A new pod (after a node's loss) has a new IP: the Hub's route follows it."""
        if not self.server or not (sandbox.get("status") or {}).get("podIPs"):
            return
        url = self._url(sandbox)
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        host = host.strip("[]")
        if (self.server.ip, int(self.server.port)) != (host, int(port)):
            self.log.warning("%s moved to %s", self._log_name, url)
            self.server.ip, self.server.port = host, int(port)
            self.db.commit()

    async def delete_forever(self) -> None:
        """The user (or named server) is deleted: the Sandbox, and the PVC it owns, go."""
        if not self.delete_home_on_user_delete:
            self.log.info("%s: keeping Sandbox %s/%s (delete_home_on_user_delete is off)",
                          self._log_name, self.namespace, self.sandbox_name)  # fmt: skip
            return
        await self.kube.delete(SANDBOXES, self.namespace, self.sandbox_name)
        await self._end_kernels()
        self.log.info("%s: deleted Sandbox %s/%s and its home", self._log_name,
                      self.namespace, self.sandbox_name)  # fmt: skip


async def _answers(url: str) -> bool:
    """The server at ``url`` accepts a TCP connection."""
    where = urlparse(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(where.hostname, where.port or 80), 1
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _message(exc: ApiException) -> str:
    import json

    try:
        return json.loads(exc.body).get("message") or str(exc)
    except (TypeError, ValueError):
        return str(exc)
