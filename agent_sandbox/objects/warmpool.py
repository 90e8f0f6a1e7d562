"""What a SandboxWarmPool wants: how many members to add or remove, and what a new one is."""

from __future__ import annotations

from typing import Any

from .. import api
from ..kube import owner_reference
from .conditions import is_true
from .template import blueprint_hash, secure_blueprint

Obj = dict[str, Any]


def pool_selector(pool_name: str) -> str:
    return f"{api.LABEL_WARM_POOL_SANDBOX}={api.name_hash(pool_name)}"


def new_member(pool: Obj, template: Obj) -> Obj:
    meta = pool["metadata"]
    spec = secure_blueprint(template)
    pod_meta = spec["podTemplate"].setdefault("metadata", {})
    pod_meta.setdefault("annotations", {})[api.ANNOTATION_SAFE_TO_EVICT] = "true"
    return {
        "metadata": {
            "generateName": f"{meta['name']}-",
            "namespace": meta["namespace"],
            "labels": {
                api.LABEL_WARM_POOL_SANDBOX: api.name_hash(meta["name"]),
                api.LABEL_TEMPLATE_REF_HASH: api.name_hash(template["metadata"]["name"]),
                api.LABEL_TEMPLATE_HASH: blueprint_hash(template),
                api.LABEL_LAUNCH_TYPE: api.LAUNCH_WARM,
                api.LABEL_CREATED_BY: api.CREATED_BY_CONTROLLER,
            },
            "annotations": {api.ANNOTATION_TEMPLATE_REF: template["metadata"]["name"]},
            "ownerReferences": [owner_reference(pool)],
        },
        "spec": spec,
    }


def stale(member: Obj, template: Obj) -> bool:
    labels = member["metadata"].get("labels") or {}
    return labels.get(api.LABEL_TEMPLATE_HASH) != blueprint_hash(template)


def scale_down_order(members: list[Obj]) -> list[Obj]:
    """Which members go first when the pool shrinks: unready ones, then the newest."""
    return sorted(
        members,
        key=lambda m: (
            is_true(m, "Ready"),
            _newest_first(m["metadata"].get("creationTimestamp", "")),
        ),
    )


def _newest_first(stamp: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in stamp)


def pool_status(pool: Obj, active: list[Obj]) -> Obj:
    return {
        "replicas": len(active),
        "readyReplicas": sum(1 for m in active if is_true(m, "Ready")),
        "selector": pool_selector(pool["metadata"]["name"]),
        "observedGeneration": pool["metadata"].get("generation", 0),
    }
