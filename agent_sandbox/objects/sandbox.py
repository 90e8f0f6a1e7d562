"""What a Sandbox wants: its Pod, its headless Service, its PVCs, and its status."""

from __future__ import annotations

import copy
from typing import Any

from .. import api
from ..kube import owner_reference
from .conditions import Condition, condition

Obj = dict[str, Any]


def operating_mode(sandbox: Obj) -> api.OperatingMode:
    return api.OperatingMode(
        (sandbox.get("spec") or {}).get("operatingMode") or api.OperatingMode.RUNNING
    )


def strip_reserved(mapping: dict[str, str] | None) -> dict[str, str]:
    """User labels/annotations minus the keys under the API's own prefixes."""
    return {k: v for k, v in (mapping or {}).items() if not api.reserved_key(k)}


def desired_pvcs(sandbox: Obj) -> list[Obj]:
    name = sandbox["metadata"]["name"]
    pvcs = []
    for vct in sandbox["spec"].get("volumeClaimTemplates") or []:
        meta = vct.get("metadata") or {}
        pvcs.append(
            {
                "metadata": {
                    "name": api.pvc_name(meta["name"], name),
                    "namespace": sandbox["metadata"]["namespace"],
                    "labels": {
                        **(meta.get("labels") or {}),
                        api.LABEL_SANDBOX_NAME_HASH: api.name_hash(name),
                    },
                    "annotations": dict(meta.get("annotations") or {}),
                    "ownerReferences": [owner_reference(sandbox)],
                },
                "spec": copy.deepcopy(vct.get("spec") or {}),
            }
        )
    return pvcs


def pod_metadata(sandbox: Obj) -> tuple[dict[str, str], dict[str, str]]:
    """The labels and annotations the Pod should carry (kept in sync on a live pod)."""
    template = sandbox["spec"]["podTemplate"].get("metadata") or {}
    labels = strip_reserved(template.get("labels"))
    annotations = strip_reserved(template.get("annotations"))
    # Keys a claim or pool set on the Sandbox's own pod template metadata are kept as given.
    for key, value in (template.get("labels") or {}).items():
        if key in (api.LABEL_CLAIM_UID, api.LABEL_LAUNCH_TYPE, api.LABEL_TEMPLATE_REF_HASH):
            labels[key] = value
    labels[api.LABEL_SANDBOX_NAME_HASH] = api.name_hash(sandbox["metadata"]["name"])
    # Record what was propagated, so that keys later removed from the template go too.
    if annotations:
        annotations[api.ANNOTATION_PROPAGATED_ANNOTATIONS] = ",".join(sorted(annotations))
    annotations[api.ANNOTATION_PROPAGATED_LABELS] = ",".join(sorted(labels))
    return labels, annotations


def desired_pod(sandbox: Obj) -> Obj:
    name = sandbox["metadata"]["name"]
    spec = copy.deepcopy(sandbox["spec"]["podTemplate"]["spec"])
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for vct in sandbox["spec"].get("volumeClaimTemplates") or []:
        vname = vct["metadata"]["name"]
        volumes[vname] = {
            "name": vname,
            "persistentVolumeClaim": {"claimName": api.pvc_name(vname, name)},
        }
    if volumes:
        spec["volumes"] = list(volumes.values())
    labels, annotations = pod_metadata(sandbox)
    return {
        "metadata": {
            "name": name,
            "namespace": sandbox["metadata"]["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(sandbox)],
        },
        "spec": spec,
    }


def desired_service(sandbox: Obj) -> Obj:
    name = sandbox["metadata"]["name"]
    ports = []
    for container in sandbox["spec"]["podTemplate"]["spec"].get("containers") or []:
        for port in container.get("ports") or []:
            proto = port.get("protocol", "TCP")
            ports.append(
                {
                    "name": port.get("name") or f"p-{port['containerPort']}-{proto.lower()}",
                    "port": port["containerPort"],
                    "targetPort": port["containerPort"],
                    "protocol": proto,
                }
            )
    return {
        "metadata": {
            "name": name,
            "namespace": sandbox["metadata"]["namespace"],
            "labels": {api.LABEL_SANDBOX_NAME_HASH: api.name_hash(name)},
            "ownerReferences": [owner_reference(sandbox)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {api.LABEL_SANDBOX_NAME_HASH: api.name_hash(name)},
            "ports": ports,
        },
    }


def pod_ready(pod: Obj | None) -> bool:
    if not pod or pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return status.get("phase") == "Running" and ready and bool(pod_ips(pod))


def pod_ips(pod: Obj | None) -> list[str]:
    status = (pod or {}).get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    return ips or ([status["podIP"]] if status.get("podIP") else [])


def sandbox_status(
    sandbox: Obj,
    *,
    pod: Obj | None,
    pods_owned: int,
    pod_not_owned: bool,
    service: Obj | None,
    cluster_domain: str,
) -> Obj:
    """The Sandbox's status from what exists now (pure; conditions without timestamps)."""
    meta = sandbox["metadata"]
    generation = meta.get("generation")
    suspended = operating_mode(sandbox) is api.OperatingMode.SUSPENDED
    phase = ((pod or {}).get("status") or {}).get("phase")
    want_service = sandbox["spec"].get("service")
    service_ok = service is not None or want_service is not True
    conds: list[Condition] = []

    if pods_owned > 1:
        ready = condition(
            "Ready",
            False,
            api.Reason.MULTIPLE_PODS,
            f"{pods_owned} pods are controlled by this sandbox",
            generation,
        )
    elif suspended:
        ready = condition("Ready", False, api.Reason.SANDBOX_SUSPENDED, "", generation)
    elif phase == "Succeeded":
        ready = condition("Ready", False, api.Reason.POD_SUCCEEDED, "", generation)
    elif phase == "Failed":
        ready = condition("Ready", False, api.Reason.POD_FAILED, "", generation)
    elif pod_ready(pod) and service_ok:
        ready = condition("Ready", True, api.Reason.DEPENDENCIES_READY, "", generation)
    else:
        ready = condition(
            "Ready",
            False,
            api.Reason.DEPENDENCIES_NOT_READY,
            "waiting for the pod" if service_ok else "waiting for the service",
            generation,
        )
    conds.append(ready)

    if pod_not_owned:
        conds.append(condition("Suspended", False, api.Reason.POD_NOT_OWNED, "", generation))
    elif not suspended:
        conds.append(condition("Suspended", False, api.Reason.NOT_SUSPENDED, "", generation))
    elif pod is None:
        conds.append(condition("Suspended", True, api.Reason.POD_TERMINATED, "", generation))
    else:
        conds.append(condition("Suspended", False, api.Reason.POD_TERMINATING, "", generation))

    if pod is not None:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled":
                conds.append(
                    condition(
                        "PodScheduled",
                        c.get("status", "Unknown"),
                        c.get("reason") or "PodScheduled",
                        c.get("message", ""),
                        generation,
                    )
                )
        if phase in ("Succeeded", "Failed"):
            reason = api.Reason.POD_SUCCEEDED if phase == "Succeeded" else api.Reason.POD_FAILED
            conds.append(condition("Finished", True, reason, "", generation))

    status: Obj = {
        "conditions": conds,
        "selector": api.selector(meta["name"]),
        "service": None,
        "serviceFQDN": None,
    }
    if service is not None:
        status["service"] = service["metadata"]["name"]
        status["serviceFQDN"] = api.service_fqdn(meta["name"], meta["namespace"], cluster_domain)
    ips = pod_ips(pod) if pod is not None and not suspended else []
    status["podIPs"] = ips
    # None clears a field in a merge patch (an empty string reaches a 1.20 server as null).
    status["nodeName"] = ((pod or {}).get("spec") or {}).get("nodeName") or None
    return status
