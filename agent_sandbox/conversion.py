"""v1alpha1 <-> v1beta1 conversion (pure functions) for the CRDs' conversion webhook.

Upstream serves v1alpha1 (deprecated) beside the stored v1beta1 through a
conversion webhook; so does this controller (:mod:`agent_sandbox.webhook`).
The rules:

* Sandbox: v1alpha1 ``spec.replicas`` 0|1 is v1beta1 ``operatingMode``
  Suspended|Running; ``status.replicas`` is 1 unless suspended.
* SandboxClaim: v1alpha1 ``sandboxTemplateRef`` + ``warmpool`` (none, default
  or a pool name) becomes ``warmPoolRef``: the named pool, else
  ``shadow-pool-<template>``; the template name is kept in an annotation so
  that converting back loses nothing.
* SandboxTemplate: ``volumeClaimTemplatesPolicy`` exists only in v1beta1 (kept
  in an annotation on the way down). SandboxWarmPool: the same in both.
"""

from __future__ import annotations

import copy
from typing import Any

from . import api

_TEMPLATE_NOTE = api.PREFIX + "v1alpha1-sandbox-template-ref"
_WARMPOOL_NOTE = api.PREFIX + "v1alpha1-warmpool"
_VCT_POLICY_NOTE = api.PREFIX + "v1beta1-volume-claim-templates-policy"
SHADOW_POOL_PREFIX = "shadow-pool-"


def convert(obj: dict[str, Any], desired_api_version: str) -> dict[str, Any]:
    """``obj`` converted to ``desired_api_version`` (same group); a new dict."""
    out = copy.deepcopy(obj)
    version = desired_api_version.partition("/")[2]
    current = obj["apiVersion"].partition("/")[2]
    out["apiVersion"] = desired_api_version
    if current == version:
        return out
    kind = obj["kind"]
    up = version == api.V1BETA1
    if kind == api.SANDBOX.kind:
        _sandbox_up(out) if up else _sandbox_down(out)
    elif kind == api.SANDBOX_CLAIM.kind:
        _claim_up(out) if up else _claim_down(out)
    elif kind == api.SANDBOX_TEMPLATE.kind:
        _template_up(out) if up else _template_down(out)
    return out


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj.setdefault("metadata", {})
    if meta.get("annotations") is None:
        meta["annotations"] = {}
    return meta["annotations"]


def _sandbox_up(obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    replicas = spec.pop("replicas", 1)
    spec["operatingMode"] = (
        api.OperatingMode.SUSPENDED if replicas == 0 else api.OperatingMode.RUNNING
    ).value
    (obj.get("status") or {}).pop("replicas", None)


def _sandbox_down(obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    suspended = spec.pop("operatingMode", api.OperatingMode.RUNNING) == api.OperatingMode.SUSPENDED
    spec["replicas"] = 0 if suspended else 1
    status = obj.get("status")
    if status is not None:
        status.pop("nodeName", None)
        status["replicas"] = 0 if suspended else 1


def _claim_up(obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    template = (spec.pop("sandboxTemplateRef", None) or {}).get("name", "")
    warmpool = spec.pop("warmpool", None)
    notes = _annotations(obj)
    notes[_TEMPLATE_NOTE] = template
    if warmpool is not None:
        notes[_WARMPOOL_NOTE] = warmpool
    pool = (
        warmpool if warmpool not in (None, "", "none", "default") else SHADOW_POOL_PREFIX + template
    )
    spec["warmPoolRef"] = {"name": pool}


def _claim_down(obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    pool = (spec.pop("warmPoolRef", None) or {}).get("name", "")
    notes = _annotations(obj)
    template = notes.pop(_TEMPLATE_NOTE, None)
    warmpool = notes.pop(_WARMPOOL_NOTE, None)
    if template is None:
        template = pool.removeprefix(SHADOW_POOL_PREFIX)
        warmpool = "default" if pool.startswith(SHADOW_POOL_PREFIX) else pool
    spec["sandboxTemplateRef"] = {"name": template}
    if warmpool is not None:
        spec["warmpool"] = warmpool


def _template_up(obj: dict[str, Any]) -> None:
    policy = _annotations(obj).pop(_VCT_POLICY_NOTE, None)
    if policy:
        obj.setdefault("spec", {})["volumeClaimTemplatesPolicy"] = policy


def _template_down(obj: dict[str, Any]) -> None:
    policy = obj.setdefault("spec", {}).pop("volumeClaimTemplatesPolicy", None)
    if policy:
        _annotations(obj)[_VCT_POLICY_NOTE] = policy


def review_response(review: dict[str, Any]) -> dict[str, Any]:
    """Answer a ``ConversionReview`` (apiextensions.k8s.io/v1)."""
    request = review.get("request", {})
    uid = request.get("uid", "")
    try:
        converted = [convert(o, request["desiredAPIVersion"]) for o in request.get("objects", [])]
        result: dict[str, Any] = {"status": "Success"}
    except Exception as exc:  # reported to the API server, which reports it to the client
        converted, result = [], {"status": "Failure", "message": f"conversion failed: {exc}"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "response": {"uid": uid, "convertedObjects": converted, "result": result},
    }
