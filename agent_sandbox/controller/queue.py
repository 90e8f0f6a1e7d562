"""A coalescing work queue per kind, as controller-runtime has: one reconcile per object at a time.

kopf delivers watch events; each only *triggers* a reconcile of a key
(namespace, name). While a key is being reconciled, more triggers for it
coalesce into one rerun, so a burst of pod events costs one pass. A reconcile
returns how long until it wants to look again (expiry, grace periods), and a
failure is retried with exponential backoff. Reconcilers read the current
state and are idempotent: the queue may run any key at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from .. import metrics

Key = tuple[str, str]
ReconcileFn = Callable[[str, str], Awaitable[float | None]]

log = logging.getLogger(__name__)


def _namespace_terminating(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 403 and "NamespaceTerminating" in str(
        getattr(exc, "body", "")
    )


class ReconcileQueue:
    def __init__(self, kind: str, reconcile: ReconcileFn, workers: int = 16):
        self.kind = kind
        self._reconcile = reconcile
        self._pending: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}
        self._workers = [asyncio.create_task(self._work()) for _ in range(workers)]

    def trigger(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._pending.put_nowait(key)

    def requeue_after(self, key: Key, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if (timer := self._timers.pop(key, None)) is not None:
            timer.cancel()
        self._timers[key] = loop.call_later(max(seconds, 0.0), self.trigger, *key)

    async def _work(self) -> None:
        while True:
            key = await self._pending.get()
            self._queued.discard(key)
            self._running.add(key)
            started = time.perf_counter()
            try:
                after = await self._reconcile(*key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                after = None  # its namespace is going: nothing to reconcile any more
                if not _namespace_terminating(exc):
                    count = self._failures.get(key, 0) + 1
                    self._failures[key] = count
                    metrics.RECONCILE_ERRORS.labels(self.kind).inc()
                    log.exception("reconcile %s %s/%s failed (attempt %d)", self.kind, *key, count)
                    after = min(0.2 * 2**count, 30.0)
            else:
                self._failures.pop(key, None)
            finally:
                self._running.discard(key)
                metrics.RECONCILES.labels(self.kind).inc()
                metrics.RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - started)
            if key in self._dirty:
                self._dirty.discard(key)
                self.trigger(*key)
            elif after is not None:
                self.requeue_after(key, after)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
