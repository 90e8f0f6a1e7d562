"""JupyterHub on Kubernetes, every user's server in a Sandbox that hibernates (SandboxSpawner).

    jupyterhub -f jupyter_config/kubernetes/jupyterhub_config.py

SandboxSpawner is KubeSpawner with the pod in a ``Sandbox`` (Agent Sandbox API):
everything below is KubeSpawner configuration, under its own class name. The
user's home is a PVC the Sandbox owns: it survives hibernation and goes when
the user is deleted. Users' servers run under gVisor by default; the profiles
offer Kata with a GPU, and a trusted server whose kernels each run in a
Sandbox of their own. Environment variables are what differs per deployment.
"""

import os
import sys

from sandbox_spawner.profiles import with_controller_key
from sandbox_spawner.service import hub_role

c = get_config()  # noqa: F821 (provided by traitlets when the file is loaded)

c.JupyterHub.spawner_class = "sandbox"
c.SandboxSpawner.namespace = os.environ.get("POD_NAMESPACE", "default")
c.SandboxSpawner.start_timeout = 300
c.SandboxSpawner.default_url = "/lab"
c.SandboxSpawner.cmd = ["jupyterhub-singleuser"]
c.SandboxSpawner.working_dir = "/home/jovyan"
c.SandboxSpawner.mem_limit = "2G"
c.SandboxSpawner.cpu_limit = 1.0
# What the scheduler reserves per server: without guarantees a pod's requests are its
# limits, and a node held one server per core however idle they were.
c.SandboxSpawner.mem_guarantee = "512M"
c.SandboxSpawner.cpu_guarantee = 0.1
# Pods get no API credentials unless a profile needs them (the per-kernel one does).
c.SandboxSpawner.automount_service_account_token = False
# Never root, whatever the image says; the home volume belongs to the pod's group (the
# kubelet gives a volume to fsGroup: without it a fresh volume is root's and the server
# cannot write its home). 1000 and 100 as in Jupyter's images and Zero to JupyterHub.
c.SandboxSpawner.uid = 1000
c.SandboxSpawner.fs_gid = 100

# The home: a PVC per user server, mounted at /home/jovyan. In the Sandbox it becomes a
# volume claim template named after the volume ("home"): the PVC is home-<sandbox name>.
c.SandboxSpawner.storage_pvc_ensure = True
c.SandboxSpawner.storage_capacity = os.environ.get("JUPYTER_SANDBOX_HOME_SIZE", "10Gi")
c.SandboxSpawner.volumes = [
    {"name": "home", "persistentVolumeClaim": {"claimName": "{pvc_name}"}}
]
c.SandboxSpawner.volume_mounts = [{"name": "home", "mountPath": "/home/jovyan"}]

# The per-kernel profile's servers claim kernels' Sandboxes with one controller key, the
# Secret jupyter-sandbox-controller-key (mounted into that profile's servers only), whose
# public half the warm pools' templates pin (kubernetes/python-gvisor.yaml). Make both once:
#   jupyter sandbox controller-key --key-file=controller-ed25519.pem   # prints ed25519:...
#   kubectl create secret generic jupyter-sandbox-controller-key \
#       --from-file=controller-ed25519.pem
# Every server of that profile holds the key: a user's code there could claim a warm kernel
# sandbox before the server that asked for it connects (that kernel's start fails); it
# gets nothing of another user's. The gVisor profile runs kernels inside the user's own
# sandbox and needs no key.
c.SandboxSpawner.profile_list = [
    {
        "display_name": "gVisor (untrusted code)",
        "slug": "gvisor",
        "description": "Your server and its kernels in a gVisor sandbox.",
        "default": True,
        "kubespawner_override": {"extra_pod_config": {"runtimeClassName": "gvisor"}},
    },
    {
        "display_name": "GPU (Kata)",
        "slug": "gpu",
        "description": "A Kata VM with one GPU passed through, for machine learning.",
        "kubespawner_override": {
            "extra_pod_config": {"runtimeClassName": "kata-qemu-nvidia-gpu"},
            "extra_resource_limits": {"nvidia.com/gpu": "1"},
        },
    },
    {
        "display_name": "Each kernel in its own Sandbox",
        "slug": "kernels",
        "description": "A trusted server; every kernel runs in a Sandbox claimed from a warm "
        "pool (gVisor), labelled with your name and gone when your server stops.",
        # With the deployment's controller key mounted (see above).
        "kubespawner_override": with_controller_key({
            # Claim rights in this namespace only (see kubernetes/rbac.yaml).
            "service_account": "jupyter-sandbox-kernels",
            "automount_service_account_token": True,
            # The image has this project and its cluster kernelspecs
            # (kubernetes/kernels/), whose warm pools live in this namespace.
            "environment": {"JUPYTER_SANDBOX_NAMESPACE": c.SandboxSpawner.namespace},
        }),
    },
]

# The service "sandbox-service": the Agent Sandbox controller (leader-elected: a second Hub
# replica's stays passive), the hibernator (a server with no busy kernel, no open terminal
# and no activity for JUPYTER_SANDBOX_HIBERNATE_AFTER seconds hibernates: its pod goes, its
# Sandbox and home stay) and Prometheus metrics at /metrics on the service's URL. Its
# Kubernetes permissions are the controller's (kubernetes/rbac.yaml), bound to the Hub's
# service account; its Hub permissions are the role below.
namespace = c.SandboxSpawner.namespace
service_host = os.environ.get("JUPYTER_SANDBOX_SERVICE_HOST", "127.0.0.1")
service_port = os.environ.get("JUPYTER_SANDBOX_SERVICE_PORT", "10101")
c.JupyterHub.services = [{
    "name": "sandbox-service",
    "url": f"http://{service_host}:{service_port}",
    "command": [
        sys.executable, "-m", "sandbox_spawner.service",
        "--controller", f"--namespace={namespace}",
        f"--lease-namespace={os.environ.get('JUPYTER_SANDBOX_LEASE_NAMESPACE', namespace)}",
        "--hibernate",
        f"--timeout={os.environ.get('JUPYTER_SANDBOX_HIBERNATE_AFTER', '3600')}",
    ],
    # The Hub passes a service little of its environment: the API server's address (in a
    # pod) or a kubeconfig (outside) must be handed on.
    "environment": {k: os.environ[k] for k in ("KUBERNETES_SERVICE_HOST",
                    "KUBERNETES_SERVICE_PORT", "KUBECONFIG") if k in os.environ},
}]  # fmt: skip
c.JupyterHub.load_roles = [hub_role()]  # its Hub permissions, and no more

# Binder links (<hub>/services/sandbox-service/v2/gh/<org>/<repo>/<ref>): on when the Hub
# sees the prepared commits' volume (kubernetes/binder.yaml, mounted in the Hub's pod) at
# JUPYTER_SANDBOX_BINDER_CACHE. Preparations run in pods (gVisor) that reach only this
# pod's egress proxy (POD_IP:8899); a launched repository is a named server of the user's
# (the "gVisor" profile), its home their copy of the repository.
binder_cache = os.environ.get("JUPYTER_SANDBOX_BINDER_CACHE")
if binder_cache:
    from kubespawner import KubeSpawner

    from sandbox_spawner.binder.web import settings_arguments

    # The preparations' image: the servers' (their Python, pip, this project).
    image = os.environ.get("JUPYTER_SANDBOX_SINGLEUSER_IMAGE") or c.SandboxSpawner.get(
        "image", KubeSpawner.image.default_value)
    c.JupyterHub.services[0]["command"] += [
        "--binder-links", "--binder-pods", f"--binder-cache={binder_cache}",
        f"--binder-namespace={namespace}", f"--binder-image={image}",
        f"--binder-proxy-address={os.environ.get('POD_IP', '127.0.0.1')}:8899",
        "--binder-profile=gvisor",
        # JUPYTER_SANDBOX_BINDER_HOSTS, _BASES, _INDEX, _EGRESS: as in the local
        # configuration (allowed hosts, providers' bases, pip's index, more egress hosts).
        *settings_arguments(),
    ]  # fmt: skip
    c.JupyterHub.services[0]["oauth_no_confirm"] = True
    c.JupyterHub.load_roles = [
        hub_role(binder=True),
        {"name": "user", "scopes": ["self", "access:services!service=sandbox-service"]},
    ]
    c.JupyterHub.allow_named_servers = True
    c.SandboxSpawner.binder_cache = binder_cache

# Hibernated servers keep their token; a visit resumes the server without a click.
c.JupyterHub.implicit_spawn_seconds = 1
# Users' servers outlive a Hub restart (the Sandboxes are found again).
c.JupyterHub.cleanup_servers = False
