"""What every reconciler shares: the API client, the watch store, the queues, the options."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..kube import Kube, Obj, Resource, is_status
from .store import Store

if TYPE_CHECKING:
    from .queue import ReconcileQueue


@dataclass
class Options:
    cluster_domain: str = "cluster.local"
    #: Replace warm-pool members that are not Ready after this long (seconds).
    warm_pool_readiness_grace: float = 300.0
    warm_pool_max_batch: int = 300
    #: How long a claim waits for a warm member with pod IPs before starting cold.
    claim_adoption_wait: float = 2.0
    #: A pool refills this long after its last adoption: a burst of claims costs one refill.
    refill_delay: float = 0.5
    #: Sandbox events within this window cost one reconcile.
    sandbox_debounce: float = 0.2
    #: While claims wait for a sandbox, work none of them needs (Events, the follow-up
    #: reconcile of Ready sandboxes, refills) waits until they are served, at most this long:
    #: a burst of claims then has the API server and the CPU to itself.
    burst_hold: float = 2.0


@dataclass
class Context:
    kube: Kube
    options: Options = field(default_factory=Options)
    queues: dict[str, ReconcileQueue] = field(default_factory=dict)
    store: Store = field(default_factory=Store)
    #: Warm members promised to a claim whose adoption is under way, per (namespace, pool):
    #: concurrent claims each get a different member instead of racing for the oldest.
    reserved: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    #: Allowed label domains per namespace, with the monotonic time they expire.
    allowed_domains: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    #: The status each object was last given, by (kind, namespace, name): the store can lag
    #: behind our own writes, and comparing against it alone would write the same status again.
    written: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    #: Claims waiting for a sandbox, by (namespace, name): since when (monotonic).
    waiting: dict[tuple[str, str], float] = field(default_factory=dict)
    _background: set[asyncio.Task] = field(default_factory=set)
    _held: set[tuple[str, str, str]] = field(default_factory=set)

    # -- reading ----------------------------------------------------------------------------
    async def read(self, res: Resource, namespace: str, name: str) -> Obj | None:
        """An object from the watch store, else (not seen yet) from the API server."""
        found = self.store.get(res.kind, namespace, name)
        return found if found is not None else await self.kube.get(res, namespace, name)

    # -- status writes ----------------------------------------------------------------------
    async def write_status(self, res: Resource, obj: Obj, status: Obj) -> bool:
        """Merge-patch ``status`` onto ``obj``'s status subresource unless nothing changed.

        True when written; False when unchanged or the object is gone.
        """
        if self.unchanged(obj, status):
            return False
        meta = obj["metadata"]
        try:
            await self.kube.patch(
                res, meta["namespace"], meta["name"], {"status": status}, sub="status"
            )
        except Exception as exc:
            if is_status(exc, 404):
                return False
            raise
        self.wrote(obj, status)
        return True

    def unchanged(self, obj: Obj, status: Obj) -> bool:
        """True when ``status`` is what ``obj`` has, or what this controller last wrote."""
        current = obj.get("status") or {}
        if all(current.get(k) == v for k, v in status.items()):
            return True
        return self.written.get(_key(obj)) == _untimed(status)

    def wrote(self, obj: Obj, status: Obj) -> None:
        self.written[_key(obj)] = _untimed(status)

    # -- scheduling -------------------------------------------------------------------------
    def trigger(self, kind: str, namespace: str, name: str) -> None:
        queue = self.queues.get(kind)
        if queue is not None:
            queue.trigger(namespace, name)

    def trigger_after(self, kind: str, namespace: str, name: str, seconds: float) -> None:
        """Reconcile after ``seconds``; a later call for the same object postpones it."""
        queue = self.queues.get(kind)
        if queue is not None:
            queue.requeue_after((namespace, name), seconds)

    # -- bursts of claims -------------------------------------------------------------------
    def claim_waiting(self, namespace: str, name: str) -> None:
        self.waiting.setdefault((namespace, name), time.monotonic())

    def claim_served(self, namespace: str, name: str) -> None:
        self.waiting.pop((namespace, name), None)

    def busy(self) -> bool:
        """Claims are waiting (each counts for ``burst_hold`` at most: a claim that cannot
        be served, such as one naming a missing pool, does not hold work back for long)."""
        if not self.waiting:
            return False
        oldest = time.monotonic() - self.options.burst_hold
        for key in [k for k, since in self.waiting.items() if since < oldest]:
            del self.waiting[key]
        return bool(self.waiting)

    async def quiet(self) -> None:
        """Return when no claim waits, or after ``burst_hold`` seconds."""
        deadline = time.monotonic() + self.options.burst_hold
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def after_burst(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` once the waiting claims are served (best-effort writes: Events)."""

        async def later() -> None:
            await self.quiet()
            await coro

        self.background(later())

    def trigger_when_quiet(self, kind: str, namespace: str, name: str, seconds: float) -> None:
        """Reconcile ``seconds`` after the waiting claims are served; once per object."""
        key = (kind, namespace, name)
        if key in self._held:
            return
        self._held.add(key)

        async def later() -> None:
            try:
                await self.quiet()
            finally:
                self._held.discard(key)
            self.trigger_after(kind, namespace, name, seconds)

        self.background(later())

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` without waiting for it (best-effort writes such as Events)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _key(obj: Obj) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj.get("kind", ""), meta["namespace"], meta["name"])


def _untimed(status: Obj) -> Obj:
    """``status`` without transition times (a stale read re-stamps them)."""
    conds = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or []
    ]
    return {**status, "conditions": conds}
