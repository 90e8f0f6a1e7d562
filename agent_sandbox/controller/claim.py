"""The SandboxClaim reconciler: bind a claim to a warm member (or a cold Sandbox), mirror status.

Lookup, as upstream: ``status.sandbox.name``, then the claim's
``sandbox-name`` annotation, then a Sandbox named as the claim; else a cold
start when the claim injects env or volumes, else adoption from the pool.
Adoption annotates the claim first, then moves the Sandbox with a patch that
carries its resourceVersion, so two claims can never take the same member.
"""

from __future__ import annotations

import logging
import time

from .. import api, metrics
from ..kube import (
    CLAIMS,
    CONFIGMAPS,
    SANDBOXES,
    TEMPLATES,
    WARM_POOLS,
    is_controlled_by,
    is_status,
    now,
    parse_time,
)
from ..objects import claim as desired
from ..objects.conditions import condition, find, merge
from .context import Context

log = logging.getLogger(__name__)


async def reconcile(ctx: Context, namespace: str, name: str) -> float | None:
    log.debug("claim %s/%s reconcile", namespace, name)
    kube = ctx.kube
    claim = await ctx.read(CLAIMS, namespace, name)
    if claim is None or claim["metadata"].get("deletionTimestamp"):
        ctx.claim_served(namespace, name)
        return None
    gen = claim["metadata"].get("generation")
    ready_now = find((claim.get("status") or {}).get("conditions"), "Ready") or {}
    if ready_now.get("status") != "True":
        ctx.claim_waiting(namespace, name)
    if ready_now.get("reason") == api.Reason.CLAIM_EXPIRED:
        return None  # expiry is final
    bound = await _bound_sandbox(ctx, claim)

    expires = desired.expiry(claim, bound)
    if expires is not None and now() >= expires:
        await _expire(ctx, claim, bound)
        return None
    requeue = max((expires - now()).total_seconds(), 1.0) if expires else None

    if bound is None and _bound_name(claim):
        await _not_ready(ctx, claim, api.Reason.SANDBOX_MISSING, "the claimed sandbox is gone")
        return None

    if bound is None:
        pool_name = (claim["spec"].get("warmPoolRef") or {}).get("name", "")
        pool = await ctx.read(WARM_POOLS, namespace, pool_name)
        if pool is None:
            message = f"warm pool {pool_name!r} not found"
            await _not_ready(ctx, claim, api.Reason.WARM_POOL_NOT_FOUND, message)
            return 60.0
        template_name = pool["spec"]["sandboxTemplateRef"]["name"]
        template = await ctx.read(TEMPLATES, namespace, template_name)
        if template is None:
            message = f"template {template_name!r} not found"
            await _not_ready(ctx, claim, api.Reason.TEMPLATE_NOT_FOUND, message)
            return 60.0
        try:
            desired.validate_metadata(claim, template, await _allowed_domains(ctx, namespace))
            if desired.needs_cold_start(claim):
                bound = await _cold_start(ctx, claim, template)
            else:
                bound, wait = await _adopt(ctx, claim, pool, template)
                if bound is None and wait:
                    message = "waiting for a warm sandbox"
                    await _not_ready(ctx, claim, api.Reason.SANDBOX_CREATE_PENDING, message)
                    return wait
        except desired.Rejected as rejected:
            await kube.event(claim, rejected.reason, str(rejected), "Warning")
            await _not_ready(ctx, claim, rejected.reason, str(rejected))
            return None
        if bound is None:
            return 0.5

    await _status(ctx, claim, bound, _ready_from(bound, gen))
    log.debug("claim %s/%s bound to %s", namespace, name, bound["metadata"]["name"])
    return requeue


#: Reasons a claim stops waiting for: it will not be served by waiting.
_FINAL = {api.Reason.CLAIM_EXPIRED, api.Reason.SANDBOX_EXPIRED, api.Reason.SANDBOX_MISSING,
          api.Reason.WARM_POOL_NOT_FOUND, api.Reason.TEMPLATE_NOT_FOUND}  # fmt: skip


async def _not_ready(ctx: Context, claim, reason: api.Reason, message: str = "") -> None:
    gen = claim["metadata"].get("generation")
    await _status(ctx, claim, None, condition("Ready", False, reason, message, gen))


def _bound_name(claim) -> str | None:
    return ((claim.get("status") or {}).get("sandbox") or {}).get("name") or (
        claim["metadata"].get("annotations") or {}
    ).get(api.ANNOTATION_SANDBOX_NAME)


async def _bound_sandbox(ctx: Context, claim):
    """The Sandbox this claim holds: by status or annotation, by its uid label, or cold-named."""
    meta = claim["metadata"]
    ns = meta["namespace"]
    named = _bound_name(claim)
    candidates = [await ctx.read(SANDBOXES, ns, named)] if named else []
    candidates += ctx.store.labelled(api.SANDBOX.kind, api.LABEL_CLAIM_UID, ns, meta["uid"])
    candidates.append(ctx.store.get(api.SANDBOX.kind, ns, meta["name"]))
    for sandbox in candidates:
        if sandbox is not None and is_controlled_by(sandbox, claim):
            return sandbox
    return None


def _ready_from(sandbox, gen):
    ready = find((sandbox.get("status") or {}).get("conditions"), "Ready")
    if ready and ready.get("status") == "True":
        return condition("Ready", True, api.Reason.DEPENDENCIES_READY, "", gen)
    reason = (ready or {}).get("reason")
    if reason == api.Reason.SANDBOX_EXPIRED:
        return condition("Ready", False, api.Reason.SANDBOX_EXPIRED, "", gen)
    return condition(
        "Ready", False, api.Reason.SANDBOX_NOT_READY, (ready or {}).get("reason", ""), gen
    )


async def _status(ctx: Context, claim, sandbox, ready) -> None:
    old = claim.get("status") or {}
    conds = [ready]
    if sandbox is not None:
        finished = find((sandbox.get("status") or {}).get("conditions"), "Finished")
        if finished:
            conds.append({k: finished[k] for k in ("type", "status", "reason") if k in finished})
    status = {
        "conditions": merge(old.get("conditions"), conds),
        "sandbox": desired.claim_sandbox_status(sandbox),
    }
    meta = claim["metadata"]
    if ready["status"] == "True" or ready.get("reason") in _FINAL:
        ctx.claim_served(meta["namespace"], meta["name"])
    if not await ctx.write_status(CLAIMS, claim, status):
        return
    was_ready = (find(old.get("conditions"), "Ready") or {}).get("status") == "True"
    if ready["status"] == "True" and not was_ready:
        launch = ((sandbox or {}).get("metadata", {}).get("labels") or {}).get(
            api.LABEL_LAUNCH_TYPE, api.LAUNCH_COLD
        )
        created = parse_time(meta["creationTimestamp"])
        metrics.CLAIM_STARTUP_LATENCY.labels(launch).observe(
            (now() - created).total_seconds() * 1000
        )


async def _allowed_domains(ctx: Context, namespace: str) -> list[str]:
    cached = ctx.allowed_domains.get(namespace)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    domains = await _read_allowed_domains(ctx, namespace)
    ctx.allowed_domains[namespace] = (time.monotonic() + 30.0, domains)
    return domains


async def _read_allowed_domains(ctx: Context, namespace: str) -> list[str]:
    for ns in (namespace, "agent-sandbox-system"):
        try:
            cm = await ctx.kube.get(CONFIGMAPS, ns, api.CONFIG_MAP_NAME)
        except Exception as exc:
            if not is_status(exc, 403):
                raise
            # A controller bound to its own namespace (a Hub's) may not read the
            # system namespace: that configuration is then not its.
            continue
        value = ((cm or {}).get("data") or {}).get(api.CONFIG_KEY_ALLOWED_LABEL_DOMAINS)
        if value:
            return [d.strip() for d in value.split(",") if d.strip()]
    return list(api.DEFAULT_ALLOWED_LABEL_DOMAINS)


async def _cold_start(ctx: Context, claim, template):
    body = desired.cold_sandbox(claim, template)
    ns = claim["metadata"]["namespace"]
    try:
        sandbox = await ctx.kube.create(SANDBOXES, ns, body)
    except Exception as exc:
        if not is_status(exc, 409):
            raise
        return await ctx.kube.get(SANDBOXES, ns, body["metadata"]["name"])
    ctx.after_burst(ctx.kube.event(
        claim,
        api.EventReason.SANDBOX_PROVISIONED,
        f"cold-started sandbox {sandbox['metadata']['name']}",
    ))  # fmt: skip
    return sandbox


async def _adopt(ctx: Context, claim, pool, template):
    """(the adopted sandbox or None, seconds to wait before trying again or 0)."""
    meta = claim["metadata"]
    ns = meta["namespace"]
    pool_hash = api.name_hash(pool["metadata"]["name"])
    members = [
        m
        for m in ctx.store.labelled(api.SANDBOX.kind, api.LABEL_WARM_POOL_SANDBOX, ns, pool_hash)
        if is_controlled_by(m, pool)
    ]
    reserved = ctx.reserved.setdefault((ns, pool["metadata"]["name"]), set())
    # A reservation lasts until the member has left the pool (no longer listed as a member).
    reserved &= {m["metadata"]["name"] for m in members}
    candidate = desired.pick_candidate(
        [m for m in members if m["metadata"]["name"] not in reserved]
    )
    if candidate is None:
        age = (now() - parse_time(meta["creationTimestamp"])).total_seconds()
        if age < ctx.options.claim_adoption_wait:
            return None, 0.2
        return await _cold_start(ctx, claim, template), 0
    name = candidate["metadata"]["name"]
    reserved.add(name)
    sandbox, wait = await _take(ctx, claim, candidate, pool)
    if sandbox is None:
        reserved.discard(name)
    return sandbox, wait


async def _take(ctx: Context, claim, candidate, pool):
    """Move ``candidate`` to the claim; its resourceVersion makes a second taker fail.

    The claim needs no annotation first (upstream writes one): the adopted Sandbox
    carries the claim's uid as a label, which finds it again after any crash.
    """
    kube = ctx.kube
    ns, name = claim["metadata"]["namespace"], candidate["metadata"]["name"]
    try:
        sandbox = await kube.patch(SANDBOXES, ns, name, desired.adoption_patch(candidate, claim))
    except Exception as exc:
        if not is_status(exc, 409, 404):
            raise
        return None, 0.01  # the member changed or went meanwhile: pick again
    # The Event and the refill wait until the waiting claims are served (Context.busy):
    # a burst of claims then costs one refill, behind it.
    ctx.after_burst(
        kube.event(claim, api.EventReason.SANDBOX_ADOPTED, f"adopted warm sandbox {name}")
    )
    ctx.trigger_when_quiet(
        api.SANDBOX_WARM_POOL.kind, ns, pool["metadata"]["name"], ctx.options.refill_delay
    )
    return sandbox, 0


async def _expire(ctx: Context, claim, sandbox) -> None:
    kube = ctx.kube
    meta = claim["metadata"]
    policy = (claim["spec"].get("lifecycle") or {}).get(
        "shutdownPolicy"
    ) or api.ShutdownPolicy.RETAIN
    already = find((claim.get("status") or {}).get("conditions"), "Ready") or {}
    if already.get("reason") != api.Reason.CLAIM_EXPIRED:
        await kube.event(claim, api.EventReason.CLAIM_EXPIRED, "the claim's lifetime is over")
        await _not_ready(ctx, claim, api.Reason.CLAIM_EXPIRED)
    if policy in (api.ShutdownPolicy.DELETE, api.ShutdownPolicy.DELETE_FOREGROUND):
        propagation = (
            "Foreground" if policy == api.ShutdownPolicy.DELETE_FOREGROUND else "Background"
        )
        await kube.delete(
            CLAIMS, meta["namespace"], meta["name"], propagation=propagation, uid=meta["uid"]
        )
    elif sandbox is not None:
        await kube.delete(
            SANDBOXES,
            meta["namespace"],
            sandbox["metadata"]["name"],
            uid=sandbox["metadata"]["uid"],
        )
