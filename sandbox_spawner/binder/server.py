"""A launched repository's server: what a spawner adds to a user's sandbox for it.

The launcher starts a named server with ``user_options = {"binder": {"repo": KEY,
"commit": SHA, "anonymous": bool}}``. The spawner reads them here (a user may send
any options: only a prepared commit of the cache is accepted, named by key and
commit, never by path) and gives the server

* the user's own copy of the repository as its home (``<home>/binder/<KEY>`` on the
  host, at ``/home/jovyan`` inside, as repo2docker lays it out): made from the
  prepared commit on the first launch and kept, with the user's changes, for the
  next (anonymous users' copies go with the user). The home is the user's to change
  while the Hub copies (their default server may be running): the copy is made by the
  user's uid, through no link (:mod:`.home_copy`);
* the prepared environment read-only at :data:`~.prepare.ENV_PATH`, first on
  ``PYTHONPATH`` and ``PATH`` (so kernels import the repository's packages);
* the repository's ``start`` script, when it has one, run before the server with
  the server's command as its arguments (``exec "$@"``), as on mybinder.org.

On Kubernetes (:meth:`BinderServer.kube_pod`) the named server's own home volume is the
user's copy: :mod:`.begin` fills it from the prepared commit (mounted read-only from the
cache volume, as is the environment) on the first start.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_provisioner import filesystem

from . import child
from .prepare import ENV_PATH, Prepared, UnusableRecord, load
from .seal import valid_site

OPTION = "binder"
#: In a server's pod on Kubernetes: the prepared commit's files, read-only (copied once).
REPO_SOURCE = "/srv/binder-repo"
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,80}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: Seconds the copy of a repository into a home may take.
COPY_TIMEOUT = 900.0
_CHILD_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


class BadBinderOptions(ValueError):
    """``user_options["binder"]`` names no prepared commit; the message says why."""


class CopyFailed(RuntimeError):
    """The user's copy of the repository could not be made; the message says why."""


@dataclass(frozen=True)
class BinderServer:
    prepared: Prepared
    key: str
    anonymous: bool

    @property
    def site(self) -> str:
        return f"{ENV_PATH}/{self.prepared.record['site']}"

    def env(self) -> dict[str, str]:
        """The server's variables for the launch (``PATH`` gets ``ENV_PATH/bin`` first:
        locally from the spawner, on Kubernetes from :mod:`.begin`, as the image's PATH is
        known only there)."""
        return {"PYTHONPATH": self.site, "BINDER_REPO_URL": self.prepared.record["url"],
                "BINDER_REF": self.prepared.record["commit"]}  # fmt: skip

    def mounts(self) -> list[filesystem.ExtraMount]:
        return [filesystem.ExtraMount(str(self.prepared.env), ENV_PATH, False)]

    def argv(self, argv: list[str], home: str) -> list[str]:
        start = self.prepared.record.get("start")
        return [f"{home}/{start}", *argv] if start else argv

    def kube_pod(self, pod: dict[str, Any], claim: str, home: str,
                 python: str = "python3") -> dict[str, Any]:  # fmt: skip
        """KubeSpawner's pod (serialized) with the launch added: the cache volume (``claim``)
        read-only, the environment and the commit's files from it, and the server's
        command run through :mod:`.begin`."""
        pod = copy.deepcopy(pod)
        entry = f"{self.key}/{self.prepared.path.name}"
        pod["spec"].setdefault("volumes", []).append(
            {"name": "binder-cache", "persistentVolumeClaim": {"claimName": claim,
                                                                "readOnly": True}})  # fmt: skip
        container = pod["spec"]["containers"][0]
        container.setdefault("volumeMounts", []).extend([
            {"name": "binder-cache", "mountPath": ENV_PATH, "subPath": f"{entry}/env",
             "readOnly": True},
            {"name": "binder-cache", "mountPath": REPO_SOURCE, "subPath": f"{entry}/repo",
             "readOnly": True},
        ])  # fmt: skip
        env = container.setdefault("env", [])
        env += [{"name": k, "value": v} for k, v in self.env().items()]
        start = self.prepared.record.get("start")
        begin = [python, "-m", "sandbox_spawner.binder.begin", "--from", REPO_SOURCE,
                 "--home", home, *(["--start", start] if start else []), "--"]  # fmt: skip
        if container.get("command"):
            args = container.pop("args", None) or []
            container["command"] = [*begin, *container["command"], *args]
        else:  # the image's entrypoint runs the arguments
            container["args"] = [*begin, *(container.get("args") or [])]
        return pod

    async def copy_for(self, home: Path, uid: int, gid: int) -> Path:
        """The user's copy of the repository (made now from the prepared commit if the user
        has none), ``<home>/binder/<key>``: made by the user's uid, never through a link of
        the home, never over what is there (:mod:`.home_copy`, a child process: the Hub's
        event loop goes on meanwhile). :class:`CopyFailed` says why there is none."""
        argv = [sys.executable, "-m", "sandbox_spawner.binder.home_copy",
                str(self.prepared.repo), str(home), self.key, str(uid), str(gid)]  # fmt: skip
        try:
            code, _, err = await child.run(argv, env=_CHILD_ENV, cwd="/", timeout=COPY_TIMEOUT)
        except TimeoutError:  # (and a start that was cancelled: the copy ends too)
            raise CopyFailed(f"copying the repository into your home took more than "
                             f"{COPY_TIMEOUT:g}s") from None  # fmt: skip
        if code != 0:
            raise CopyFailed("your copy of the repository could not be made: "
                             f"{child.last_line(err, code)}")  # fmt: skip
        return home / "binder" / self.key


def from_user_options(options: dict[str, Any], cache_root: Path) -> BinderServer | None:
    """The launched repository the options name, None for a server that is no launch."""
    raw = options.get(OPTION)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadBinderOptions("user_options['binder'] must be a mapping")
    key, commit = raw.get("repo"), raw.get("commit")
    if not isinstance(key, str) or not _KEY.match(key):
        raise BadBinderOptions(f"user_options['binder']['repo']: {key!r} is no repository key")
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise BadBinderOptions(f"user_options['binder']['commit']: {commit!r} is no commit")
    try:
        prepared = load(cache_root / key / commit)
    except UnusableRecord as exc:
        raise BadBinderOptions(f"{key} at {commit[:12]} has an unusable record ({exc}): an "
                               "administrator removes it from the cache") from None
    if prepared is None:
        raise BadBinderOptions(f"{key} at {commit[:12]} has not been prepared: launch it "
                               "through its Binder link")  # fmt: skip
    if not valid_site(prepared.record.get("site")):
        raise BadBinderOptions(f"{key} at {commit[:12]} was prepared with an unusable "
                               "environment: an administrator removes it from the "
                               "cache")  # fmt: skip
    return BinderServer(prepared, key, bool(raw.get("anonymous")))
