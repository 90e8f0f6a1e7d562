"""The Hub half: each JupyterHub user's server in a sandbox.

* :mod:`.local`: ``LocalSandboxSpawner`` (spawner ``local-sandbox``), a user's
  server in a local gVisor or bubblewrap sandbox, run by a supervisor of its own
  (:mod:`.supervisor`);
* :mod:`.kubernetes`: ``SandboxSpawner`` (spawner ``sandbox``), KubeSpawner with
  each server in a Sandbox that hibernates (:mod:`.manifests`: the pure part);
* :mod:`.service`: the Hub service ``sandbox-service``: the Agent Sandbox
  controller (Kubernetes), the :mod:`.hibernator` (stops servers with no busy
  kernel, no open terminal and no recent activity; files stay, a visit
  resumes) and their metrics; :mod:`.starts` records start durations for it, and
  :mod:`.activity` lets it ask a server whether it is in use without handing it
  any credential;
* :mod:`.freezing` and :mod:`.hibernation`: an idle server kept with its memory,
  frozen in place or saved to disk (gVisor), by its supervisor (:mod:`.quiesce`: the
  server's side of a hibernation);
* :mod:`.hub_instance`: what makes one Hub's names its own on a shared machine (its
  instance id, its range of host uids, user names as keys);
* :mod:`.binder`: Binder-style links: a URL opens a repository, running, in a sandbox
  (served by the Hub service; both spawners).

It may use the provisioner's parts (``sandbox_provisioner``); the provisioner
never imports it.
"""

import asyncio
import os
import secrets
import shutil
from pathlib import Path


def data_root() -> Path:
    """Where a Hub of this project keeps what outlives servers (homes, prepared Binder
    commits, servers' state): the system's as root, else the user's."""
    if os.geteuid() == 0:
        return Path("/var/lib/jupyter-sandbox")
    return Path(os.path.expanduser("~/.local/share/jupyter-sandbox"))


async def remove_aside(path: Path) -> None:
    """``path`` gone: renamed aside at once (nothing finds it by its name any more), then
    removed off the event loop (a home, a run directory or an image may hold many files,
    or gigabytes)."""
    aside = path.with_name(f".removing-{path.name}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    await asyncio.to_thread(shutil.rmtree, aside, True)
