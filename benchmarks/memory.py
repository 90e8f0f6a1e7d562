"""The memory a sandbox's host processes hold, for the benchmarks: RSS and PSS summed over
them, as ``jupyter sandbox ps`` counts it."""

from __future__ import annotations

from sandbox_provisioner.sandboxes import memory_bytes

__all__ = ["memory_bytes"]
