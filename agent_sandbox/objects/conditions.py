"""Status conditions, with lastTransitionTime kept while a condition's status is unchanged."""

from __future__ import annotations

from typing import Any

from ..kube import timestamp

Condition = dict[str, Any]


def condition(
    type_: str, status: bool | str, reason: str, message: str = "", generation: int | None = None
) -> Condition:
    value = status if isinstance(status, str) else ("True" if status else "False")
    cond: Condition = {"type": type_, "status": value, "reason": reason or type_}
    if message:  # an empty string reaches a 1.20 API server as null, which the schema refuses
        cond["message"] = message
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge(old: list[Condition] | None, new: list[Condition]) -> list[Condition]:
    """``new`` conditions, each stamped with the old transition time if its status held."""
    before = {c["type"]: c for c in old or []}
    merged = []
    for cond in new:
        prev = before.get(cond["type"])
        stamp = (
            prev.get("lastTransitionTime") if prev and prev["status"] == cond["status"] else None
        )
        merged.append({**cond, "lastTransitionTime": stamp or timestamp()})
    return merged


def find(conditions: list[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(obj: dict[str, Any], type_: str) -> bool:
    cond = find((obj.get("status") or {}).get("conditions"), type_)
    return bool(cond and cond.get("status") == "True")
