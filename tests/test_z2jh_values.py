"""The Zero to JupyterHub values (jupyter_config/kubernetes/z2jh-values.yaml): their
hub.extraConfig, run as the chart runs it (after its own configuration, with the values'
extraEnv), makes a Hub with SandboxSpawner and a sandbox-service whose command the service
itself accepts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

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
    c.KubeSpawner.profile_list = values["singleuser"]["profileList"]
    c.KubeSpawner.image = "quay.io/jupyter/scipy-notebook:2026-11-01"  # the chart sets it
    env["POD_IP"] = "10.1.2.3"  # a fieldRef (status.podIP)
    monkeypatch.setenv("POD_IP", env["POD_IP"])
    for code in values["hub"]["extraConfig"].values():
        exec(compile(code, "extraConfig", "exec"), {"c": c})
    assert c.JupyterHub.spawner_class == "sandbox"
    (svc,) = c.JupyterHub.services
    assert svc["name"] == "sandbox-service"
    assert svc["environment"]["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert c.JupyterHub.load_roles == [
        service.hub_role(binder=True),
        {"name": "user", "scopes": ["self", "access:services!service=sandbox-service"]},
    ]
    assert c.JupyterHub.allow_named_servers and c.SandboxSpawner.binder_cache
    mounts = {m["name"]: m["mountPath"] for m in values["hub"]["extraVolumeMounts"]}
    assert mounts["binder-cache"] == c.SandboxSpawner.binder_cache
    command = svc["command"]
    assert command[1:3] == ["-m", "sandbox_spawner.service"]
    args = service.parser().parse_args(command[3:])
    assert args.controller and args.namespace == ["jhub"] and args.lease_namespace == "jhub"
    assert args.hibernate and args.timeout == 3600
    assert args.binder and args.binder_pods and args.binder_cache == c.SandboxSpawner.binder_cache
    assert args.binder_image == "quay.io/jupyter/scipy-notebook:2026-11-01"
    assert args.binder_proxy_address == "10.1.2.3:8899" and args.binder_namespace == "jhub"
    assert args.binder_profile in {p["slug"] for p in values["singleuser"]["profileList"]}
    # Every profile's override names real SandboxSpawner (KubeSpawner) traits.
    traits = SandboxSpawner.class_traits()
    for profile in values["singleuser"]["profileList"]:
        assert set(profile["kubespawner_override"]) <= set(traits), profile

    # The per-kernel profile, and only it, mounts the controller key beside the home.
    home = {"name": "volume-{username}", "persistentVolumeClaim": {"claimName": "claim-x"}}
    spawner = SimpleNamespace(volumes=[home], volume_mounts=[{"name": "volume-{username}",
                              "mountPath": "/home/jovyan"}])  # fmt: skip
    by_slug = {p["slug"]: p["kubespawner_override"] for p in c.KubeSpawner.profile_list}
    kernels = by_slug.pop("kernels")
    for _ in range(2):  # a spawner started twice gets the key once
        spawner.volumes = kernels["volumes"](spawner)
        spawner.volume_mounts = kernels["volume_mounts"](spawner)
    assert [v["name"] for v in spawner.volumes] == ["volume-{username}", "controller-key"]
    assert spawner.volumes[1]["secret"]["secretName"] == "jupyter-sandbox-controller-key"
    assert [m["mountPath"] for m in spawner.volume_mounts] == [
        "/home/jovyan", "/etc/jupyter-sandbox/controller-key"]  # fmt: skip
    assert kernels["environment"]["JUPYTER_SANDBOX_CONTROLLER_KEY_FILE"].startswith(
        "/etc/jupyter-sandbox/controller-key/"
    )
    assert not any("volumes" in override for override in by_slug.values())
