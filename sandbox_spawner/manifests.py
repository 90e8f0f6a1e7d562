"""What a Hub user's Sandbox is: pure functions from KubeSpawner's manifests to the API's.

SandboxSpawner keeps KubeSpawner's pod manifest (profiles, resources, volumes,
security context, environment) and puts it in a ``Sandbox`` of the Agent
Sandbox API: the pod becomes ``spec.podTemplate``; the user's home PVC becomes
a ``volumeClaimTemplate`` named after the pod volume that mounts it, so the
controller makes the PVC (``<volume>-<sandbox>``), owns it (it survives
hibernation and goes with the Sandbox) and puts it in the pod in that volume's
place. Nothing here talks to the API server.
"""

from __future__ import annotations

import copy
from typing import Any

from agent_sandbox import api
from agent_sandbox.objects.conditions import find

Obj = dict[str, Any]

#: The name of the home's volume claim template when no pod volume mounts the PVC.
HOME_VOLUME = "home"
#: Container states that no waiting ends (KubeSpawner #795: they used to wait out the
#: start timeout).
FATAL_WAITING = {
    "ErrImagePull": "the image cannot be pulled",
    "ImagePullBackOff": "the image cannot be pulled",
    "InvalidImageName": "the image name is invalid",
    "ErrImageNeverPull": "the image is not on the node and may not be pulled",
    "CreateContainerConfigError": "the container's configuration is invalid",
    "CreateContainerError": "the container cannot be created",
}


def home_volume(pod: Obj, pvc_name: str) -> str:
    """The pod volume that mounts the user's PVC (KubeSpawner's ``{pvc_name}``)."""
    for volume in pod["spec"].get("volumes") or []:
        if (volume.get("persistentVolumeClaim") or {}).get("claimName") == pvc_name:
            return volume["name"]
    return HOME_VOLUME


def sandbox_manifest(
    name: str,
    pod: Obj,
    pvc: Obj | None = None,
    template: Obj | None = None,
) -> Obj:
    """The Sandbox for a user's server: ``pod`` (KubeSpawner's manifest, as JSON) as its
    pod template, ``pvc`` (KubeSpawner's PVC manifest) as its home's claim template.

    With ``template`` (a SandboxTemplate), the template's blueprint is the base and the
    server's container, volumes and metadata join it (:func:`merge_into_template`).
    """
    pod = copy.deepcopy(pod)
    meta = pod.get("metadata") or {}
    labels, annotations = _strings(meta.get("labels")), _strings(meta.get("annotations"))
    spec: Obj = {
        "podTemplate": {
            "metadata": {"labels": labels, "annotations": annotations},
            "spec": pod["spec"],
        },
        "service": True,  # a headless Service of the Sandbox's (stable) name
        "operatingMode": api.OperatingMode.RUNNING.value,
    }
    claims: list[Obj] = []
    if pvc is not None:
        volume = home_volume(pod, pvc["metadata"]["name"])
        pvc_meta = pvc.get("metadata") or {}
        claims.append({
            "metadata": {
                "name": volume,
                "labels": _strings(pvc_meta.get("labels")),
                "annotations": _strings(pvc_meta.get("annotations")),
            },
            "spec": copy.deepcopy(pvc["spec"]),
        })  # fmt: skip
        # The controller puts the claim in this volume's place.
        spec["podTemplate"]["spec"]["volumes"] = [
            v for v in pod["spec"].get("volumes") or [] if v["name"] != volume
        ]
    if template is not None:
        spec = merge_into_template(template, spec)
        claims = [*(template["spec"].get("volumeClaimTemplates") or []), *claims]
    if claims:
        spec["volumeClaimTemplates"] = claims
    return {
        "apiVersion": api.SANDBOX.api_version,
        "kind": api.SANDBOX.kind,
        "metadata": {"name": name, "labels": dict(labels), "annotations": dict(annotations)},
        "spec": spec,
    }


def _strings(mapping: dict[str, Any] | None) -> dict[str, str]:
    """Labels or annotations without empty values: KubeSpawner leaves ``servername`` null
    for the default server, which a Sandbox's schema refuses (and a 1.20 API server turns
    an empty string in a custom object into null)."""
    return {k: str(v) for k, v in (mapping or {}).items() if v not in (None, "")}


def merge_into_template(template: Obj, server: Obj) -> Obj:
    """A SandboxTemplate's blueprint with the server joined to it: the template's first
    container keeps its image, resources and security settings and gets the server's
    environment (the server's values win), port, command when it has none, and volume
    mounts; the server's volumes and pod metadata are added to the template's."""
    blueprint = copy.deepcopy(template["spec"]["podTemplate"])
    pod_spec = blueprint.setdefault("spec", {})
    ours = server["podTemplate"]["spec"]["containers"][0]
    theirs = pod_spec["containers"][0]
    env = {e["name"]: e for e in theirs.get("env") or []}
    env.update({e["name"]: e for e in ours.get("env") or []})
    theirs["env"] = list(env.values())
    if not theirs.get("command") and not theirs.get("args"):
        for key in ("command", "args", "workingDir"):
            if ours.get(key):
                theirs[key] = ours[key]
    theirs["ports"] = ours.get("ports") or theirs.get("ports") or []
    theirs["volumeMounts"] = [*(theirs.get("volumeMounts") or []),
                              *(ours.get("volumeMounts") or [])]  # fmt: skip
    pod_spec["volumes"] = [*(pod_spec.get("volumes") or []),
                           *(server["podTemplate"]["spec"].get("volumes") or [])]  # fmt: skip
    meta = blueprint.setdefault("metadata", {})
    for key in ("labels", "annotations"):
        meta[key] = {**(meta.get(key) or {}), **server["podTemplate"]["metadata"][key]}
    return {**server, "podTemplate": blueprint}


def resume_patch(desired: Obj) -> list[Obj]:
    """The JSON patch that runs an existing (hibernated) Sandbox again with today's pod
    template: a new token, profile or image applies; claim templates are immutable."""
    return [
        {"op": "replace", "path": "/spec/podTemplate", "value": desired["spec"]["podTemplate"]},
        {"op": "replace", "path": "/spec/operatingMode", "value": api.OperatingMode.RUNNING},
    ]


#: The scheduler's word for a pod whose claims are not bound yet: a new home's claim until
#: a provisioner or the controller manager binds it (seconds, on a real cluster), which a
#: start waits out rather than fails on.
UNBOUND_CLAIMS = "unbound immediate PersistentVolumeClaims"


def start_failure(sandbox: Obj | None, pod: Obj | None) -> str | None:
    """Why a start cannot succeed, from the Sandbox and its pod; None while it may."""
    if sandbox is None:
        return "the Sandbox was deleted"
    ready = find((sandbox.get("status") or {}).get("conditions"), api.ConditionType.READY)
    if ready and ready.get("status") == "False":
        reason = ready.get("reason")
        if reason in (api.Reason.RECONCILER_ERROR, api.Reason.MULTIPLE_PODS,
                      api.Reason.SANDBOX_EXPIRED):  # fmt: skip
            return f"{reason}: {ready.get('message') or 'no message'}"
        if reason in (api.Reason.POD_FAILED, api.Reason.POD_SUCCEEDED):
            return f"the server's pod ended ({reason}): {ready.get('message') or ''}".strip()
    if pod is None:
        return None
    status = pod.get("status") or {}
    scheduled = find(status.get("conditions"), "PodScheduled")
    if (
        scheduled
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
        and UNBOUND_CLAIMS not in (scheduled.get("message") or "")
    ):
        return f"the pod cannot be scheduled: {scheduled.get('message') or 'no node fits'}"
    for container in (status.get("containerStatuses") or []) + (
        status.get("initContainerStatuses") or []
    ):
        waiting = (container.get("state") or {}).get("waiting") or {}
        why = FATAL_WAITING.get(waiting.get("reason", ""))
        if why:
            detail = waiting.get("message") or waiting["reason"]
            return f"container {container.get('name')}: {why} ({detail})"
    return None


def owns(sandbox: Obj | None, pod: Obj | None) -> bool:
    """``pod`` is ``sandbox``'s (its controller reference), not a pod of an earlier one."""
    uid = ((sandbox or {}).get("metadata") or {}).get("uid")
    refs = ((pod or {}).get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(r.get("uid") == uid and r.get("controller") for r in refs)


def is_ready(sandbox: Obj | None) -> bool:
    ready = find(((sandbox or {}).get("status") or {}).get("conditions"), "Ready")
    return bool(ready and ready.get("status") == "True")


def is_suspended(sandbox: Obj) -> bool:
    """Hibernated: asked to suspend, and the pod is gone."""
    mode = (sandbox.get("spec") or {}).get("operatingMode")
    suspended = find((sandbox.get("status") or {}).get("conditions"), "Suspended")
    return mode == api.OperatingMode.SUSPENDED and bool(
        suspended and suspended.get("status") == "True"
    )


def describe(sandbox: Obj) -> str:
    """The Sandbox's state in a line, for the spawn page."""
    conditions = (sandbox.get("status") or {}).get("conditions") or []
    parts = []
    for cond in conditions:
        if cond.get("type") in ("Ready", "PodScheduled"):
            text = f"{cond['type']}={cond.get('status')} ({cond.get('reason')})"
            if cond.get("message"):
                text += f": {cond['message']}"
            parts.append(text)
    return "; ".join(parts) or "waiting for the controller to make its pod"
