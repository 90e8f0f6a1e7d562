"""The SandboxTemplate reconciler: its hash label and its managed NetworkPolicy."""

from __future__ import annotations

from .. import api
from ..kube import NETWORK_POLICIES, TEMPLATES, WARM_POOLS, is_controlled_by, is_status
from ..objects import template as desired
from .context import Context

#: A queue that re-triggers every pool of a template when the template changes.
POOLS_OF_TEMPLATE = "PoolsOfTemplate"


async def reconcile(ctx: Context, namespace: str, name: str) -> float | None:
    kube = ctx.kube
    tmpl = await kube.get(TEMPLATES, namespace, name)
    if tmpl is None or tmpl["metadata"].get("deletionTimestamp"):
        return None
    hash_ = api.name_hash(name)
    if (tmpl["metadata"].get("labels") or {}).get(api.LABEL_TEMPLATE_REF_HASH) != hash_:
        await kube.patch(
            TEMPLATES,
            namespace,
            name,
            {"metadata": {"labels": {api.LABEL_TEMPLATE_REF_HASH: hash_}}},
        )
    np_name = api.network_policy_name(name)
    existing = await kube.get(NETWORK_POLICIES, namespace, np_name)
    if not desired.managed(tmpl):
        if existing is not None and is_controlled_by(existing, tmpl):
            await kube.delete(NETWORK_POLICIES, namespace, np_name)
        return None
    body = desired.desired_network_policy(tmpl)
    if existing is None:
        try:
            await kube.create(NETWORK_POLICIES, namespace, body)
        except Exception as exc:
            if not is_status(exc, 409):
                raise
    elif is_controlled_by(existing, tmpl) and existing.get("spec") != body["spec"]:
        await kube.patch(NETWORK_POLICIES, namespace, np_name, {"spec": body["spec"]})
    return None


async def trigger_pools(ctx: Context, namespace: str, name: str) -> None:
    for pool in await ctx.kube.list(WARM_POOLS, namespace):
        if (pool.get("spec") or {}).get("sandboxTemplateRef", {}).get("name") == name:
            ctx.trigger(api.SANDBOX_WARM_POOL.kind, namespace, pool["metadata"]["name"])
