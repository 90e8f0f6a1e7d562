"""Pieces of SandboxSpawner profiles that both shipped Hub configurations use.

The per-kernel profile's servers claim one Sandbox per kernel from a warm pool;
the kernel agents there obey a server holding the deployment's controller key,
which the pools' templates pin by its public half. The key lives in one Secret
and is mounted only into that profile's servers (never into untrusted ones).
"""

from __future__ import annotations

from typing import Any

#: The Secret with the deployment's controller key (file ``controller-ed25519.pem``).
CONTROLLER_KEY_SECRET = "jupyter-sandbox-controller-key"
#: Where the profile's servers find it.
CONTROLLER_KEY_DIR = "/etc/jupyter-sandbox/controller-key"
_VOLUME = "controller-key"


def with_controller_key(override: dict[str, Any]) -> dict[str, Any]:
    """A profile's ``kubespawner_override`` plus the controller key: its Secret mounted
    beside the spawner's own volumes (KubeSpawner replaces lists, so these extend them when
    applied, once however often a spawner starts), and where the kernels' runtime finds it."""

    def volumes(spawner: Any) -> list[dict[str, Any]]:
        secret = {"secretName": CONTROLLER_KEY_SECRET, "defaultMode": 0o440}
        return [*_without_key(spawner.volumes), {"name": _VOLUME, "secret": secret}]

    def volume_mounts(spawner: Any) -> list[dict[str, Any]]:
        mount = {"name": _VOLUME, "mountPath": CONTROLLER_KEY_DIR, "readOnly": True}
        return [*_without_key(spawner.volume_mounts), mount]

    environment = {
        **(override.get("environment") or {}),
        "JUPYTER_SANDBOX_CONTROLLER_KEY_FILE": f"{CONTROLLER_KEY_DIR}/controller-ed25519.pem",
    }
    return {**override, "volumes": volumes, "volume_mounts": volume_mounts,
            "environment": environment}  # fmt: skip


def _without_key(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("name") != _VOLUME]
