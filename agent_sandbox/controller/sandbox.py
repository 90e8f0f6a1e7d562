"""The Sandbox reconciler: Pod, Service and PVCs of one Sandbox, and its status.

Upstream's order: expiry first, then PVCs (they outlive suspension), then the
pod (created, deleted when suspended, never rolled on spec edits), then the
Service, then status by merge patch. No finalizers: children carry a
controller ownerReference and the garbage collector removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging

from .. import api
from ..kube import (
    PODS,
    PVCS,
    SANDBOXES,
    SERVICES,
    Obj,
    is_controlled_by,
    is_status,
    now,
    parse_time,
)
from ..objects import conditions
from ..objects import sandbox as desired
from .context import Context

log = logging.getLogger(__name__)
KIND = api.SANDBOX.kind


async def reconcile(ctx: Context, namespace: str, name: str) -> float | None:
    kube = ctx.kube
    sandbox = await ctx.read(SANDBOXES, namespace, name)
    if sandbox is None or sandbox["metadata"].get("deletionTimestamp"):
        return None
    spec = sandbox["spec"]
    requeue: float | None = None

    shutdown = parse_time(spec.get("shutdownTime"))
    if shutdown is not None:
        remaining = (shutdown - now()).total_seconds()
        if remaining <= 0:
            await _expire(ctx, sandbox)
            return None
        requeue = max(remaining, 2.0)

    for pvc in desired.desired_pvcs(sandbox):
        try:
            await _ensure(ctx, PVCS, namespace, pvc, sandbox)
        except Exception as exc:
            if not _refused(exc):
                raise
            await _report_error(ctx, sandbox, exc)
            return 30.0

    hash_ = api.name_hash(name)
    pods = ctx.store.labelled("Pod", api.LABEL_SANDBOX_NAME_HASH, namespace, hash_)
    seen = {p["metadata"]["name"] for p in pods}
    pods += [
        p for p in ctx.store.expected("Pod", namespace, name) if p["metadata"]["name"] not in seen
    ]
    owned = [p for p in pods if is_controlled_by(p, sandbox)]
    owned += [await _adopt(ctx, PODS, p, sandbox) for p in pods if _adoptable(p)]
    owned = [p for p in owned if p is not None]
    named = next((p for p in pods if p["metadata"]["name"] == name), None)
    not_owned = named is not None and named not in owned
    if len(owned) > 1:
        await kube.event(
            sandbox,
            api.EventReason.MULTIPLE_PODS,
            f"{len(owned)} pods controlled by this sandbox",
            "Warning",
        )
    pod = owned[0] if owned else None
    suspended = desired.operating_mode(sandbox) is api.OperatingMode.SUSPENDED

    if suspended:
        for p in owned:
            if not p["metadata"].get("deletionTimestamp"):
                await kube.delete(PODS, namespace, p["metadata"]["name"], uid=p["metadata"]["uid"])
    elif pod is None and not not_owned:
        try:
            pod = await kube.create(PODS, namespace, desired.desired_pod(sandbox))
            ctx.store.expect("Pod", namespace, name, pod)
        except Exception as exc:
            if is_status(exc, 409):
                pod = None  # created meanwhile: its event brings us back
            elif _refused(exc):  # the pod as specified cannot exist
                await _report_error(ctx, sandbox, exc)
                return 30.0
            else:
                raise
    elif pod is not None:
        await _sync_pod_metadata(ctx, sandbox, pod)

    service = await _reconcile_service(ctx, sandbox)
    status = desired.sandbox_status(
        sandbox,
        pod=pod,
        pods_owned=len(owned),
        pod_not_owned=not_owned,
        service=service,
        cluster_domain=ctx.options.cluster_domain,
    )
    await write_status(ctx, sandbox, status)
    # Ask the owners (a claim, a warm pool) to look again: this sandbox's state feeds theirs.
    for ref in sandbox["metadata"].get("ownerReferences") or []:
        ctx.trigger(ref["kind"], namespace, ref["name"])
    return requeue


def _refused(exc: Exception) -> bool:
    """The API server refused the object as specified (no retry will change that)."""
    return is_status(exc, 400, 403, 422)


async def _report_error(ctx: Context, sandbox: Obj, exc: Exception) -> None:
    """A pod the API server refuses: Ready=False/ReconcilerError and a Warning event."""
    message = getattr(exc, "body", None) or str(exc)
    with contextlib.suppress(ValueError, TypeError):
        message = json.loads(message).get("message", message)
    await ctx.kube.event(sandbox, api.Reason.RECONCILER_ERROR, str(message), "Warning")
    ready = conditions.condition(
        "Ready",
        False,
        api.Reason.RECONCILER_ERROR,
        str(message),
        sandbox["metadata"].get("generation"),
    )
    old = (sandbox.get("status") or {}).get("conditions") or []
    await write_status(
        ctx, sandbox, {"conditions": [ready, *[c for c in old if c["type"] != "Ready"]]}
    )


async def write_status(ctx: Context, sandbox: Obj, status: Obj) -> None:
    old = sandbox.get("status") or {}
    status["conditions"] = conditions.merge(old.get("conditions"), status["conditions"])
    await ctx.write_status(SANDBOXES, sandbox, status)


async def _expire(ctx: Context, sandbox: Obj) -> None:
    meta = sandbox["metadata"]
    ns, name = meta["namespace"], meta["name"]
    for res in (PODS, SERVICES):
        obj = await ctx.kube.get(res, ns, name)
        if obj is not None and is_controlled_by(obj, sandbox):
            await ctx.kube.delete(res, ns, name, uid=obj["metadata"]["uid"])
    if sandbox["spec"].get("shutdownPolicy") == api.ShutdownPolicy.DELETE:
        await ctx.kube.delete(SANDBOXES, ns, name, uid=meta["uid"])
        return
    ready = conditions.condition(
        "Ready", False, api.Reason.SANDBOX_EXPIRED, "shutdownTime reached", meta.get("generation")
    )
    old = (sandbox.get("status") or {}).get("conditions") or []
    kept = [c for c in old if c["type"] != "Ready"]
    status = {
        "conditions": conditions.merge(old, [ready]) + kept,
        "podIPs": [],
        "nodeName": None,
        "service": None,
        "serviceFQDN": None,
    }
    await ctx.kube.patch(SANDBOXES, ns, name, {"status": status}, sub="status")


def _adoptable(obj: Obj) -> bool:
    meta = obj["metadata"]
    return (
        not meta.get("ownerReferences")
        and (meta.get("annotations") or {}).get(api.ANNOTATION_ADOPTABLE) == "true"
    )


async def _adopt(ctx: Context, res, obj: Obj, owner: Obj) -> Obj | None:
    from ..kube import owner_reference

    meta = obj["metadata"]
    try:
        return await ctx.kube.patch(
            res,
            meta["namespace"],
            meta["name"],
            {
                "metadata": {
                    "ownerReferences": [owner_reference(owner)],
                    "resourceVersion": meta["resourceVersion"],
                },
            },
        )
    except Exception as exc:
        if is_status(exc, 404, 409):
            return None
        raise


async def _ensure(ctx: Context, res, namespace: str, body: Obj, owner: Obj) -> Obj | None:
    name = body["metadata"]["name"]
    existing = await ctx.kube.get(res, namespace, name)
    if existing is None:
        try:
            return await ctx.kube.create(res, namespace, body)
        except Exception as exc:
            if not is_status(exc, 409):
                raise
            return await ctx.kube.get(res, namespace, name)
    if _adoptable(existing):
        return await _adopt(ctx, res, existing, owner)
    return existing


async def _sync_pod_metadata(ctx: Context, sandbox: Obj, pod: Obj) -> None:
    labels, annotations = desired.pod_metadata(sandbox)
    meta = pod["metadata"]
    have_labels, have_notes = meta.get("labels") or {}, meta.get("annotations") or {}
    # Keys this controller propagated earlier but the template no longer has are removed.
    label_patch = _drift(have_labels, labels, _listed(have_notes, api.ANNOTATION_PROPAGATED_LABELS))
    note_patch = _drift(
        have_notes, annotations, _listed(have_notes, api.ANNOTATION_PROPAGATED_ANNOTATIONS)
    )
    if label_patch or note_patch:
        await ctx.kube.patch(
            PODS,
            meta["namespace"],
            meta["name"],
            {"metadata": {"labels": label_patch, "annotations": note_patch}},
        )


def _listed(notes: dict[str, str], key: str) -> set[str]:
    return set(filter(None, notes.get(key, "").split(",")))


def _drift(have: dict[str, str], want: dict[str, str], propagated: set[str]) -> dict:
    """A merge patch from ``have`` to ``want``, removing only keys this controller put there."""
    patch: dict[str, str | None] = {k: v for k, v in want.items() if have.get(k) != v}
    patch.update({k: None for k in propagated - set(want) if k in have})
    return patch


async def _reconcile_service(ctx: Context, sandbox: Obj) -> Obj | None:
    meta = sandbox["metadata"]
    want = sandbox["spec"].get("service")
    services = ctx.store.labelled(
        "Service", api.LABEL_SANDBOX_NAME_HASH, meta["namespace"], api.name_hash(meta["name"])
    )
    existing = next((s for s in services if s["metadata"]["name"] == meta["name"]), None)
    if existing is None and want is True:  # created a moment ago, not seen yet?
        existing = await ctx.kube.get(SERVICES, meta["namespace"], meta["name"])
    owned = existing is not None and is_controlled_by(existing, sandbox)
    if want is True and existing is None:
        return await _ensure(
            ctx, SERVICES, meta["namespace"], desired.desired_service(sandbox), sandbox
        )
    if want is False and owned:
        await ctx.kube.delete(SERVICES, meta["namespace"], meta["name"])
        return None
    if existing is not None and not owned and _adoptable(existing):
        return await _adopt(ctx, SERVICES, existing, sandbox)
    return existing if (existing is not None and (owned or want is None)) else None
