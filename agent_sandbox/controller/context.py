"""What every reconciler shares: the API client, the queues, and the controller's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..kube import Kube

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


@dataclass
class Context:
    kube: Kube
    options: Options = field(default_factory=Options)
    queues: dict[str, ReconcileQueue] = field(default_factory=dict)

    def trigger(self, kind: str, namespace: str, name: str) -> None:
        queue = self.queues.get(kind)
        if queue is not None:
            queue.trigger(namespace, name)
