"""The memory a sandbox's host processes hold, for the benchmarks."""

from __future__ import annotations

from pathlib import Path


def memory_bytes(pids: list[int]) -> tuple[int, int]:
    """RSS and PSS summed over ``pids``: RSS counts a shared page in each process that maps
    it (gVisor's systrap maps the Sentry's memory into its stub processes too), PSS divides
    it among them."""
    totals = {"Rss:": 0, "Pss:": 0}
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            field = line.split()
            if field and field[0] in totals:
                totals[field[0]] += int(field[1]) * 1024
    return totals["Rss:"], totals["Pss:"]
