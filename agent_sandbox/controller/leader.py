"""Leader election on a coordination.k8s.io Lease, so that two replicas can run.

The holder renews the Lease every ``renew`` seconds; another replica takes it
over once it has not been renewed for ``duration`` seconds. Writes use the
Lease's resourceVersion, so two candidates can never both win. The leader
runs the reconcilers; every replica serves the conversion webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

from ..kube import LEASES, Kube, is_status, now, parse_time

log = logging.getLogger(__name__)
MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


def default_identity() -> str:
    return f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str = "agent-sandbox-controller",
        identity: str | None = None,
        duration: float = 15.0,
        renew: float = 5.0,
    ):
        self.kube, self.namespace, self.name = kube, namespace, name
        self.identity = identity or default_identity()
        self.duration, self.renew = duration, renew

    async def _try(self) -> bool:
        lease = await self.kube.get(LEASES, self.namespace, self.name)
        stamp = now().strftime(MICRO)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "renewTime": stamp,
        }
        try:
            if lease is None:
                await self.kube.create(
                    LEASES,
                    self.namespace,
                    {
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec, "acquireTime": stamp, "leaseTransitions": 0},
                    },
                )
                return True
            held = lease.get("spec") or {}
            holder = held.get("holderIdentity")
            renewed = parse_time(held.get("renewTime"))
            expired = renewed is None or (now() - renewed).total_seconds() > held.get(
                "leaseDurationSeconds", self.duration
            )
            if holder not in (None, "", self.identity) and not expired:
                return False
            if holder != self.identity:
                spec["acquireTime"] = stamp
                spec["leaseTransitions"] = held.get("leaseTransitions", 0) + 1
            lease["spec"] = {**held, **spec}
            await self.kube.replace(LEASES, self.namespace, self.name, lease)
            return True
        except Exception as exc:
            if is_status(exc, 409, 422):
                return False
            raise

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Wait to become leader, run ``lead()`` while leading; return if leadership is lost."""
        while not await self._safe_try():
            await asyncio.sleep(self.renew)
        log.info("became leader as %s", self.identity)
        task = asyncio.create_task(lead())
        try:
            while not task.done():
                await asyncio.sleep(self.renew)
                if not await self._safe_try():
                    log.warning("lost leadership")
                    break
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.done() and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]

    async def _safe_try(self) -> bool:
        try:
            return await self._try()
        except Exception:
            log.exception("leader election: lease update failed")
            return False

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            lease = await self.kube.get(LEASES, self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                await self.kube.replace(LEASES, self.namespace, self.name, lease)
