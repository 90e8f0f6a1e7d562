"""Which Hub, user and server a sandbox on this machine belongs to (``jupyter sandbox ps``).

A describer of :mod:`sandbox_provisioner.sandboxes` (entry point group
``sandbox_provisioner.describers``): a Hub server's sandbox is named for the Hub's
instance, the user's id and the server's key (:meth:`.hub_instance.HubInstance.
sandbox_name`); the machine's registry of Hubs (``<data root>/hubs``) gives the Hub's
state root, and the server's plan there its user and server names. Ending one asks its
supervisor to stop (SIGTERM): the server stops as the Hub stops it, and the Hub sees
it stopped at its next poll.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

from sandbox_provisioner.runtimes.process import is_running

from . import data_root
from .hub_instance import _read_json
from .supervisor import PLAN

_SERVER = re.compile(r"(?:kernel-)?hub-([0-9a-f]{12})-(\d+)-(.+)")


def _hub_state_root(instance: str) -> Path | None:
    registry = data_root() / "hubs"
    if not registry.is_dir():
        return None
    for entry in registry.iterdir():
        found = _read_json(entry) or {}
        if found.get("id") == instance and isinstance(found.get("state_root"), str):
            return Path(found["state_root"])
    return None


def _supervises(pid: int, state_dir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"sandbox_spawner.supervisor" in argv and os.fsencode(state_dir) in argv


def describe(sandbox: Any) -> bool:
    """Fill in a Hub server's sandbox: kind, owner, and how to end it; False if not one."""
    match = _SERVER.fullmatch(sandbox.name)
    if not match:
        return False
    instance, user_id, key = match.groups()
    sandbox.kind = "server"
    root = _hub_state_root(instance)
    state_dir = root / f"{user_id}-{key}" if root else None
    name = None
    if state_dir is not None:
        try:  # the spawner's own file, in a directory of root's
            plan = json.loads((state_dir / PLAN).read_text())
        except (OSError, ValueError):
            plan = {}
        name = plan.get("name") if isinstance(plan, dict) else None
        name = name if isinstance(name, str) else None
    parent = sandbox.parent
    if parent is None or state_dir is None or not _supervises(parent, state_dir):
        # A name anyone who starts sandboxes could take: not the Hub's server unless its
        # supervisor started it.
        sandbox.kind = "sandbox"
        sandbox.owner = (f"named as Hub {instance}'s, but not started by its supervisor"
                         f" ({sandbox.owner or 'unknown'})")  # fmt: skip
        return True
    sandbox.owner = f"Hub {instance}: {name or f'user id {user_id}, server {key}'}"
    started = sandbox.parent_start

    def end() -> None:
        if is_running(parent, started):  # still that supervisor, not a pid since reused
            os.kill(parent, signal.SIGTERM)

    sandbox.end = end
    return True

