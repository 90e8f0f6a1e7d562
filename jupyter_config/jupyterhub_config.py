"""JupyterHub on one machine, every user's server in a sandbox (LocalSandboxSpawner).

    scripts/hub          # sets up, then: jupyterhub -f jupyter_config/jupyterhub_config.py

Each user's server, with its kernels and terminals, runs in a gVisor or
bubblewrap sandbox with a persistent home (``/var/lib/jupyter-sandbox/homes``
as root), no network but loopback, and per-user limits; a Hub restart leaves
servers running and finds them again. The environment variables below are how
``scripts/hub`` passes what differs per machine; the rest is the policy.
"""

import os
import sys
from pathlib import Path

from sandbox_spawner.binder.web import settings_arguments
from sandbox_spawner.service import hub_role

c = get_config()  # noqa: F821 (provided by traitlets when the file is loaded)

data = Path(os.environ.get("JUPYTER_SANDBOX_HUB_DATA", "/var/lib/jupyter-sandbox/hub"))
c.JupyterHub.bind_url = os.environ.get("JUPYTER_SANDBOX_HUB_URL", "http://127.0.0.1:8000")
c.JupyterHub.db_url = f"sqlite:///{data / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(data / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(data / "proxy.pid")
c.JupyterHub.pid_file = str(data / "jupyterhub.pid")

# Trying it out: any user name, with the one password scripts/hub prints. For real use,
# replace this with an authenticator that knows your users: NativeAuthenticator (sign-up
# with admin approval), PAM (the machine's accounts) or OAuthenticator (GitHub, GitLab,
# your institution's OpenID Connect).
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = os.environ.get("JUPYTER_SANDBOX_HUB_PASSWORD") or None
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {"admin"}

# Every user's server in a sandbox.
c.JupyterHub.spawner_class = "local-sandbox"
c.LocalSandboxSpawner.runtime = "auto"  # gVisor when root and runsc work, else bubblewrap
c.LocalSandboxSpawner.network = "none"  # "host" lets users reach the network
c.LocalSandboxSpawner.mem_limit = "2G"
c.LocalSandboxSpawner.cpu_limit = 1.0
c.LocalSandboxSpawner.pids_limit = 1024
c.LocalSandboxSpawner.delete_home_on_user_delete = False
c.Spawner.default_url = "/lab"
# Per group, e.g. more memory for a course's staff:
# c.LocalSandboxSpawner.group_overrides = {
#     "staff": {"groups": ["staff"], "spawner_override": {"mem_limit": "8G"}},
# }

# Users' servers outlive a Hub restart (their supervisors are not the Hub's children),
# as a production Hub needs. A trial Hub (scripts/hub) stops them all when it stops
# (Ctrl+C): JUPYTER_SANDBOX_HUB_STOP_SERVERS_ON_EXIT=1.
c.JupyterHub.cleanup_servers = os.environ.get("JUPYTER_SANDBOX_HUB_STOP_SERVERS_ON_EXIT") == "1"

# Freezing and hibernation: a server with no busy kernel, no open terminal and no activity
# for ten minutes is frozen (its processes stopped where they are: no CPU, its memory kept;
# the next request thaws it in about a millisecond, kernels and variables as they were).
# After an hour it hibernates: it stops, its home stays, and visiting it starts it again.
# These suit a course (many servers, memory is what runs out). A research group's long
# analyses may want JUPYTER_SANDBOX_FREEZE_AFTER=900 and JUPYTER_SANDBOX_HIBERNATE_AFTER=28800
# (8 h); JUPYTER_SANDBOX_FREEZE_AFTER=0 never freezes. Experimental:
# JUPYTER_SANDBOX_HIBERNATE_STRATEGY=hibernate saves a gVisor server's memory to disk first
# (root's alone, at most its memory limit) and restores it on the next visit, kernels with
# their variables; on runsc 20240729 a restore loses a process now and then (the spawn page
# then says which kernels restarted, or that the server started afresh). The service serves
# Prometheus metrics at /metrics on its URL (servers running and hibernated, start and
# resume durations).
#
# Binder links: <hub>/services/sandbox-service/v2/gh/<org>/<repo>/<ref> opens a repository,
# running, in a named server of the user's own (their persistent copy of it), with the
# packages it asks for prepared once per commit in a sandbox that reaches only the package
# index and the repository's host. A form that makes links and badges:
# <hub>/services/sandbox-service/binder. Options: python -m sandbox_spawner.service --help.
# Binder settings, as variables (the service's --binder-* options):
#   JUPYTER_SANDBOX_BINDER_HOSTS   hosts repositories may come from (comma-separated fnmatch
#                                  patterns; default github.com,gitlab.com,gist.github.com),
#                                  e.g. "github.com,gitlab.example.org"
#   JUPYTER_SANDBOX_BINDER_BASES   where a provider's repositories are, e.g.
#                                  "gl=https://gitlab.example.org" (comma-separated)
#   JUPYTER_SANDBOX_BINDER_INDEX   pip's index for preparations (default: PyPI)
#   JUPYTER_SANDBOX_BINDER_EGRESS  more hosts preparations may reach (host or host:port)
hibernate_after = os.environ.get("JUPYTER_SANDBOX_HIBERNATE_AFTER", "3600")
freeze_after = os.environ.get("JUPYTER_SANDBOX_FREEZE_AFTER", "600")
strategy = os.environ.get("JUPYTER_SANDBOX_HIBERNATE_STRATEGY", "stop")
service_port = os.environ.get("JUPYTER_SANDBOX_SERVICE_PORT", "10101")
binder_cache = str(data / "binder")  # prepared environments, shared by the spawner
anonymous = False  # True: visitors launch links without logging in, as temporary users
c.JupyterHub.services = [{
    "name": "sandbox-service",
    "url": f"http://127.0.0.1:{service_port}",
    "command": [sys.executable, "-m", "sandbox_spawner.service",
                "--hibernate", f"--timeout={hibernate_after}", f"--freeze-after={freeze_after}",
                f"--strategy={strategy}",
                "--binder-links", f"--binder-cache={binder_cache}",
                "--binder-allowed-hosts=github.com,gitlab.com,gist.github.com",
                *settings_arguments(),  # the variables above (a later option wins)
                "--binder-per-repo-limit=20", *(["--binder-anonymous"] if anonymous else [])],
    "oauth_no_confirm": True,  # its pages know who is launching through the Hub's login
}]  # fmt: skip
c.JupyterHub.load_roles = [
    hub_role(binder=True, anonymous=anonymous),  # the service's permissions, and no more
    # Users may use the service's pages (Binder links), beside their own resources.
    {"name": "user", "scopes": ["self", "access:services!service=sandbox-service"]},
]
c.JupyterHub.implicit_spawn_seconds = 1  # a visit to a hibernated server resumes it
c.LocalSandboxSpawner.binder_cache = binder_cache
c.JupyterHub.allow_named_servers = True  # a launched repository is a named server
c.JupyterHub.named_server_limit_per_user = 5
