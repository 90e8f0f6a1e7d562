"""The Zero to JupyterHub values (jupyter_config/kubernetes/z2jh-values.yaml): their
hub.extraConfig, run as the chart runs it (after its own configuration, with the values'
extraEnv), makes a Hub with SandboxSpawner and a sandbox-service whose command the service
itself accepts."""

from __future__ import annotations

from pathlib import Path

import yaml
from traitlets.config import Config

from sandbox_spawner import service
from sandbox_spawner.kubernetes import SandboxSpawner

KUBERNETES = Path(__file__).resolve().parent.parent / "jupyter_config" / "kubernetes"
VALUES = KUBERNETES / "z2jh-values.yaml"


def test_extra_config_configures_the_spawner_and_the_service(monkeypatch):
    values = yaml.safe_load(VALUES.read_text())
    env = {k: v for k, v in values["hub"]["extraEnv"].items() if isinstance(v, str)}
    env |= {"POD_NAMESPACE": "jhub", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_SERVICE_PORT": "443"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    c = Config()
    c.JupyterHub.services = []  # as the chart leaves them
    c.JupyterHub.load_roles = []
    for code in values["hub"]["extraConfig"].values():
        exec(compile(code, "extraConfig", "exec"), {"c": c})
    assert c.JupyterHub.spawner_class == "sandbox"
    (svc,) = c.JupyterHub.services
    assert svc["name"] == "sandbox-service"
    assert svc["environment"]["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert c.JupyterHub.load_roles == [service.hub_role()]
    command = svc["command"]
    assert command[1:3] == ["-m", "sandbox_spawner.service"]
    args = service.parser().parse_args(command[3:])
    assert args.controller and args.namespace == ["jhub"] and args.lease_namespace == "jhub"
    assert args.proxy_url == "http://proxy-public" and args.timeout == 3600
    # Every profile's override names real SandboxSpawner (KubeSpawner) traits.
    traits = SandboxSpawner.class_traits()
    for profile in values["singleuser"]["profileList"]:
        assert set(profile["kubespawner_override"]) <= set(traits), profile
