"""What a SandboxClaim wants: validation, expiry, the warm candidate, or a cold Sandbox."""

from __future__ import annotations

import copy
import datetime
from typing import Any

from .. import api
from ..kube import owner_reference, parse_time
from .conditions import find, is_true
from .template import secure_blueprint

Obj = dict[str, Any]


class Rejected(ValueError):
    """A claim the template's policies or the label allowlist reject; ``reason`` says which."""

    def __init__(self, reason: api.Reason, message: str):
        super().__init__(message)
        self.reason = reason


def expiry(claim: Obj, sandbox: Obj | None) -> datetime.datetime | None:
    """The earliest of lifecycle.shutdownTime and (Finished time + ttlSecondsAfterFinished)."""
    lifecycle = (claim.get("spec") or {}).get("lifecycle") or {}
    times = []
    if (shutdown := parse_time(lifecycle.get("shutdownTime"))) is not None:
        times.append(shutdown)
    ttl = lifecycle.get("ttlSecondsAfterFinished")
    if ttl is not None and sandbox is not None:
        finished = find((sandbox.get("status") or {}).get("conditions"), "Finished")
        if finished and finished.get("status") == "True":
            since = parse_time(finished.get("lastTransitionTime"))
            if since is not None:
                times.append(since + datetime.timedelta(seconds=int(ttl)))
    return min(times) if times else None


def validate_metadata(claim: Obj, template: Obj, allowed_domains: list[str]) -> None:
    extra = (claim.get("spec") or {}).get("additionalPodMetadata") or {}
    tmeta = ((template.get("spec") or {}).get("podTemplate") or {}).get("metadata") or {}
    for key in extra.get("labels") or {}:
        domain = key.split("/", 1)[0] if "/" in key else ""
        if not any(domain == d or domain.endswith("." + d) for d in allowed_domains):
            raise Rejected(
                api.Reason.INVALID_METADATA,
                f"label {key!r} is outside the allowed domains ({', '.join(allowed_domains)})",
            )
        if key in (tmeta.get("labels") or {}):
            raise Rejected(api.Reason.INVALID_METADATA, f"label {key!r} overrides the template")
    for key in extra.get("annotations") or {}:
        if api.reserved_key(key):
            raise Rejected(api.Reason.INVALID_METADATA, f"annotation {key!r} is reserved")
        if key in (tmeta.get("annotations") or {}):
            raise Rejected(
                api.Reason.INVALID_METADATA, f"annotation {key!r} overrides the template"
            )


def needs_cold_start(claim: Obj) -> bool:
    """Env or volume injection makes a sandbox of its own (upstream: never a warm one)."""
    spec = claim.get("spec") or {}
    return bool(spec.get("env") or spec.get("volumeClaimTemplates"))


def cold_sandbox(claim: Obj, template: Obj) -> Obj:
    """The Sandbox for a claim that cannot take a warm one (raises Rejected per policy)."""
    spec = claim.get("spec") or {}
    tspec = template.get("spec") or {}
    blueprint = secure_blueprint(template)
    pod_spec = blueprint["podTemplate"]["spec"]
    env = spec.get("env") or []
    if env:
        policy = _injection_policy(tspec, "envVarsInjectionPolicy",
                                   api.Reason.ENV_VARS_INJECTION_REJECTED)  # fmt: skip
        containers = pod_spec.get("containers") or []
        for var in env:
            target = next(
                (c for c in containers if c["name"] == var.get("containerName")),
                containers[0] if containers else None,
            )
            if target is None:
                raise Rejected(
                    api.Reason.ENV_VARS_INJECTION_REJECTED, "no container to inject into"
                )
            current = target.setdefault("env", [])
            existing = next((e for e in current if e["name"] == var["name"]), None)
            if existing is not None and policy != api.InjectionPolicy.OVERRIDES:
                raise Rejected(
                    api.Reason.ENV_VARS_INJECTION_REJECTED,
                    f"env {var['name']!r} is set by the template",
                )
            if existing is not None:
                current.remove(existing)
            current.append({"name": var["name"], "value": var.get("value", "")})
    vcts = spec.get("volumeClaimTemplates") or []
    if vcts:
        policy = _injection_policy(tspec, "volumeClaimTemplatesPolicy",
                                   api.Reason.VOLUME_CLAIM_TEMPLATES_ERROR)  # fmt: skip
        merged = {v["metadata"]["name"]: v for v in blueprint.get("volumeClaimTemplates") or []}
        for vct in vcts:
            vname = vct["metadata"]["name"]
            if vname in merged and policy != api.InjectionPolicy.OVERRIDES:
                raise Rejected(
                    api.Reason.VOLUME_CLAIM_TEMPLATES_ERROR,
                    f"volume claim template {vname!r} is set by the template",
                )
            merged[vname] = copy.deepcopy(vct)
        blueprint["volumeClaimTemplates"] = list(merged.values())
    apply_claim_metadata(blueprint, claim, api.LAUNCH_COLD)
    meta = claim["metadata"]
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": {
                api.LABEL_CLAIM_UID: meta["uid"],
                api.LABEL_LAUNCH_TYPE: api.LAUNCH_COLD,
                api.LABEL_TEMPLATE_REF_HASH: api.name_hash(template["metadata"]["name"]),
            },
            "annotations": {api.ANNOTATION_TEMPLATE_REF: template["metadata"]["name"]},
            "ownerReferences": [owner_reference(claim)],
        },
        "spec": blueprint,
    }


def _injection_policy(template_spec: Obj, field: str, reason: api.Reason) -> str:
    """The template's policy for a kind of injection; Rejected when it is Disallowed."""
    policy = template_spec.get(field, api.InjectionPolicy.DISALLOWED)
    if policy == api.InjectionPolicy.DISALLOWED:
        raise Rejected(reason, f"the template's {field} is Disallowed")
    return policy


def apply_claim_metadata(spec: Obj, claim: Obj, launch_type: str) -> None:
    """Put the claim's pod metadata (and its uid, launch type) on a sandbox spec's pod template."""
    extra = (claim.get("spec") or {}).get("additionalPodMetadata") or {}
    pod_meta = spec["podTemplate"].setdefault("metadata", {})
    labels = pod_meta.setdefault("labels", {})
    labels.update(extra.get("labels") or {})
    labels[api.LABEL_CLAIM_UID] = claim["metadata"]["uid"]
    labels[api.LABEL_LAUNCH_TYPE] = launch_type
    notes = pod_meta.setdefault("annotations", {})
    notes.update(extra.get("annotations") or {})
    notes.pop(api.ANNOTATION_SAFE_TO_EVICT, None)


def pick_candidate(members: list[Obj]) -> Obj | None:
    """A warm member to adopt: has pod IPs, Ready preferred, then first in, first out."""
    usable = [
        m
        for m in members
        if not m["metadata"].get("deletionTimestamp") and (m.get("status") or {}).get("podIPs")
    ]
    usable.sort(key=lambda m: (not is_true(m, "Ready"), m["metadata"].get("creationTimestamp", "")))
    return usable[0] if usable else None


def adoption_patch(sandbox: Obj, claim: Obj) -> Obj:
    """The merge patch that moves a pool member to a claim (only the pod template's
    metadata changes: the patch names nothing else, which keeps it small in a burst)."""
    pod_meta = copy.deepcopy(sandbox["spec"]["podTemplate"].get("metadata") or {})
    spec = {"podTemplate": {"metadata": pod_meta}}
    apply_claim_metadata(spec, claim, api.LAUNCH_WARM)
    # A merge patch keeps keys it does not name: the pool's eviction hint must be removed.
    spec["podTemplate"]["metadata"]["annotations"][api.ANNOTATION_SAFE_TO_EVICT] = None
    return {
        "metadata": {
            "resourceVersion": sandbox["metadata"]["resourceVersion"],
            "labels": {
                api.LABEL_WARM_POOL_SANDBOX: None,
                api.LABEL_CLAIM_UID: claim["metadata"]["uid"],
                api.LABEL_LAUNCH_TYPE: api.LAUNCH_WARM,
            },
            "ownerReferences": [owner_reference(claim)],
        },
        "spec": spec,
    }


def claim_sandbox_status(sandbox: Obj | None) -> Obj:
    if sandbox is None:
        return {}
    return {
        "name": sandbox["metadata"]["name"],
        "podIPs": list((sandbox.get("status") or {}).get("podIPs") or []),
    }
