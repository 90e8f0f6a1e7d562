"""The SandboxWarmPool reconciler: keep ``replicas`` members, replace those that never get ready.

Members are Sandboxes the pool controls and labels with the pool's hash;
adoption by a claim removes both, so a claimed sandbox is never touched here.
"""

from __future__ import annotations

import asyncio
import logging

from .. import api
from ..kube import (
    PODS,
    SANDBOXES,
    TEMPLATES,
    WARM_POOLS,
    is_controlled_by,
    is_status,
    now,
    parse_time,
)
from ..objects import warmpool as desired
from ..objects.conditions import is_true
from .context import Context

log = logging.getLogger(__name__)


async def reconcile(ctx: Context, namespace: str, name: str) -> float | None:
    kube = ctx.kube
    pool = await ctx.read(WARM_POOLS, namespace, name)
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        return None
    if ctx.busy():  # claims are waiting: refilling now would compete with them
        ctx.trigger_when_quiet(api.SANDBOX_WARM_POOL.kind, namespace, name, 0)
        return None
    spec = pool.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    template = await ctx.read(TEMPLATES, namespace, spec["sandboxTemplateRef"]["name"])
    seen = ctx.store.labelled(
        api.SANDBOX.kind, api.LABEL_WARM_POOL_SANDBOX, namespace, api.name_hash(name)
    )
    names = {m["metadata"]["name"] for m in seen}
    pending = ctx.store.expected(api.SANDBOX.kind, namespace, name)
    members = [m for m in seen if is_controlled_by(m, pool)]
    members += [m for m in pending if m["metadata"]["name"] not in names]
    active = [m for m in members if not m["metadata"].get("deletionTimestamp")]
    requeue: float | None = None

    if template is None:
        await _write_status(ctx, pool, active)
        return 60.0

    doomed = []
    strategy = (spec.get("updateStrategy") or {}).get("type", api.UpdateStrategy.ON_REPLENISH)
    if strategy == api.UpdateStrategy.RECREATE:
        doomed += [m for m in active if desired.stale(m, template)]
    grace = ctx.options.warm_pool_readiness_grace
    for member in active:
        if member in doomed or is_true(member, "Ready"):
            continue
        age = (now() - parse_time(member["metadata"]["creationTimestamp"])).total_seconds()
        if age < grace:
            requeue = min(requeue or grace, grace - age + 1)
        elif await _unschedulable(ctx, member):
            await kube.event(
                pool,
                api.EventReason.WARM_POOL_NOT_PROGRESSING,
                f"{member['metadata']['name']} cannot be scheduled",
                "Warning",
            )
            requeue = 60.0
        else:
            doomed.append(member)
    keep = [m for m in active if m not in doomed]
    if len(keep) > replicas:
        doomed += desired.scale_down_order(keep)[: len(keep) - replicas]
        keep = [m for m in keep if m not in doomed]
    await asyncio.gather(
        *(
            kube.delete(SANDBOXES, namespace, m["metadata"]["name"], uid=m["metadata"]["uid"])
            for m in doomed
        )
    )

    # Members still terminating count: creating beside them would overshoot (upstream #1215).
    terminating = len(members) - len(active) + len(doomed)
    missing = min(replicas - len(keep) - terminating, ctx.options.warm_pool_max_batch)
    if missing > 0:
        body = desired.new_member(pool, template)
        results = await asyncio.gather(
            *(kube.create(SANDBOXES, namespace, body) for _ in range(missing)),
            return_exceptions=True,
        )
        created = [r for r in results if isinstance(r, dict)]
        for member in created:  # counted until their watch events arrive: no over-creation
            ctx.store.expect(api.SANDBOX.kind, namespace, name, member)
        keep += created
        for error in (r for r in results if isinstance(r, BaseException)):
            if not is_status(error, 409):
                raise error
    elif replicas - len(keep) > 0:
        requeue = min(requeue or 1.0, 1.0)  # wait for the terminating ones to go
    await _write_status(ctx, pool, keep)
    return requeue


async def _unschedulable(ctx: Context, member) -> bool:
    pod = await ctx.kube.get(PODS, member["metadata"]["namespace"], member["metadata"]["name"])
    for cond in ((pod or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            return True
    return False


async def _write_status(ctx: Context, pool, active) -> None:
    await ctx.write_status(WARM_POOLS, pool, desired.pool_status(pool, active))
