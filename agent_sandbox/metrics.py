"""Prometheus metrics of the controller (served by ``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

#: Upstream's metric: time from a claim's creation to its Ready condition.
CLAIM_STARTUP_LATENCY = Histogram(
    "agent_sandbox_claim_startup_latency_ms",
    "Time from SandboxClaim creation to Ready, in milliseconds.",
    ["launch_type"],
    buckets=(25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
)
RECONCILES = Counter("agent_sandbox_reconcile_total", "Reconciles run, by kind.", ["kind"])
RECONCILE_ERRORS = Counter(
    "agent_sandbox_reconcile_errors_total", "Reconciles that failed, by kind.", ["kind"]
)
RECONCILE_SECONDS = Histogram(
    "agent_sandbox_reconcile_duration_seconds", "Duration of one reconcile, by kind.", ["kind"]
)
