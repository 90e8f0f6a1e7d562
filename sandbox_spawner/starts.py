"""How long a server's start took, kept in the spawner's state for the service's metrics.

The Hub does not say when a server became ready, only when its start began. So
each of this project's spawners records its last start (seconds from the start
call to the server's URL, whether it was a resume of a hibernated server, from
its memory's image or not, and when) in its state, which the service reads
(scope ``admin:server_state``) and turns into the ``jupyter_sandbox_start_seconds``
histogram.
"""

from __future__ import annotations

import datetime
import time
from typing import Any


class RecordsStarts:
    """Mixin for a Spawner: ``record_start`` at the end of ``start``; kept in its state."""

    last_start: dict[str, Any] | None = None

    def record_start(self, began: float, resumed: bool, restored: bool = False) -> None:
        """``began``: ``time.monotonic()`` when the start was called; ``restored``: the
        server came back from a hibernation's image, kernels and all."""
        self.last_start = {
            "seconds": round(time.monotonic() - began, 3),
            "resumed": resumed,
            "strategy": "hibernate" if restored else "stop",
            "at": datetime.datetime.now(datetime.UTC).isoformat(),
        }

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()  # type: ignore[misc]
        if self.last_start:
            state["last_start"] = self.last_start
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)  # type: ignore[misc]
        self.last_start = state.get("last_start")
