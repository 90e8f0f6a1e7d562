"""Isolation runtimes, found by entry point (group ``sandbox_provisioner.runtimes``).

``auto`` picks the strongest runtime available on this machine. A runtime
that is named but cannot run is an error that says what to install: the
provisioner never falls back to running a kernel unsandboxed.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any

from .base import (
    Availability,
    RuntimeUnavailable,
    Sandbox,
    SandboxRuntime,
    banner_arguments,
    history_arguments,
)

ENTRY_POINT_GROUP = "sandbox_provisioner.runtimes"
AUTO = "auto"

__all__ = [
    "AUTO",
    "Availability",
    "RuntimeUnavailable",
    "Sandbox",
    "SandboxRuntime",
    "banner_arguments",
    "create_runtime",
    "history_arguments",
    "runtime_classes",
]


@functools.lru_cache(maxsize=1)
def runtime_classes() -> dict[str, type[SandboxRuntime]]:
    """Every installed runtime by name, strongest first."""
    found = {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return dict(sorted(found.items(), key=lambda kv: -kv[1].strength))


def known_names() -> list[str]:
    return [AUTO, *runtime_classes()]


def create_runtime(name: str, **kwargs: Any) -> SandboxRuntime:
    """The runtime called ``name`` (or the strongest available one for ``auto``).

    Raises ValueError for an unknown name and RuntimeUnavailable when nothing
    usable is installed; ``kwargs`` go to the runtime (``parent=`` for config).
    """
    classes = runtime_classes()
    if name == AUTO:
        reasons = []
        for cls in classes.values():
            if not cls.local:
                continue
            runtime = cls(**kwargs)
            found = runtime.availability()
            if found.available:
                return runtime
            reasons.append(f"{cls.name}: {found}")
        raise RuntimeUnavailable(
            "no sandbox runtime is available on this machine ("
            + " | ".join(reasons)
            + "). The kernel was not started: it never runs unsandboxed."
        )
    if name not in classes:
        raise ValueError(
            f"unknown sandbox runtime {name!r}; choose one of: {', '.join(known_names())}"
        )
    return classes[name](**kwargs)
