"""A repository's environment, prepared once per commit in a sandbox, and cached.

``Preparer.prepare(link, commit)`` fetches the repository at the commit (on the
host, with :mod:`.refs`' safe git), reads what it asks for (:mod:`.environment`),
and, when it asks for packages or a ``postBuild``, runs those in a sandbox of this
project's runtimes (gVisor or bubblewrap):

* as an unprivileged user (the sandbox uid when the Hub is root), with the
  repository writable at ``/home/jovyan`` (as repo2docker lays it out) and the
  environment's prefix writable at :data:`ENV_PATH`; the system and the Python
  read-only; nothing else of the host;
* with no network but the egress proxy (:mod:`.egress`): only the package index
  and the repository's host (and what the deployment adds) can be reached;
* with a time limit, memory, CPU and process limits (cgroups as root), and limits on
  disk (apparent sizes) and files, checked as it runs and once it has ended.

What the sandbox wrote is input to the service, which is root: its log is streamed from
the file first found under that name (never through a link, up to a bound), and the
rest is measured, read and sealed by descriptor (:mod:`.seal`, :mod:`.untrusted`), off
the event loop. The result goes to ``<cache>/<repository key>/<commit>/`` (``repo/``,
``env/``, ``prepared.json``), readable by every user, moved there in one rename once
complete, and is never written again: every launch of that commit, by any user, uses
it read-only. A lock per commit makes concurrent launches of one commit prepare it once.

The record (``prepared.json``) holds what the repository asked for, bounded as it is
read (:mod:`.environment`); it is written within :data:`RECORD_LIMIT` bytes and read (by
the service at each launch, by the Hub at each start of a server) by descriptor, never
through a link, and refused past that bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sandbox_provisioner import filesystem, identity, pyenv
from sandbox_provisioner.launch.plan import own_module
from sandbox_provisioner.runtimes import AUTO, create_runtime
from sandbox_provisioner.spec import NetworkMode, ResourceLimits, SandboxSpec

from . import refs, seal, untrusted
from .egress import Allowlist, EgressProxy
from .environment import BadRepository, read_environment
from .inside import ENV_PATH, SITE_FILE, site_dir
from .links import RepoLink

#: Where the repository is, in the preparation (and, the user's copy, in their server).
REPO_PATH = "/home/jovyan"
_EGRESS_DIR = "/run/jupyter-sandbox-egress"
_PLAN_DIR = "/run/jupyter-sandbox-build"
PREPARED = "prepared.json"
#: Bytes a prepared commit's record may have (written within it; refused past it when read).
RECORD_LIMIT = 4 << 20
#: Hosts a preparation may always reach: the Python Package Index.
DEFAULT_EGRESS = ("pypi.org", "files.pythonhosted.org")

Emit = Callable[[str, str], None]


class PreparationFailed(RuntimeError):
    """The repository's environment could not be prepared; the message says why."""


class UnusableRecord(ValueError):
    """A prepared commit whose record cannot be used (too large, no regular file, not a
    record); the message says why."""


@dataclass(frozen=True)
class Prepared:
    """A prepared commit: read-only, shared by every launch of it."""

    path: Path
    record: dict[str, Any]

    @property
    def repo(self) -> Path:
        return self.path / "repo"

    @property
    def env(self) -> Path:
        return self.path / "env"


@dataclass
class PrepareLimits:
    timeout: float = 600.0
    memory_bytes: int = 2 << 30
    #: The repository and the environment together, in apparent sizes (a sparse file
    #: counts its length: a copy of it may write that much).
    disk_bytes: int = 5 << 30
    #: Files, directories and links of the repository and the environment together.
    files: int = 250_000
    cpus: float = 1.0
    pids: int = 512
    #: Bytes of the preparation's log shown on the launch page.
    log_bytes: int = 8 << 20


@dataclass
class Preparer:
    cache_root: Path
    runtime: str = AUTO
    #: Hosts (``host`` or ``host:port``, fnmatch patterns) the preparation may reach, beside
    #: the repository's own host.
    egress: tuple[str, ...] = DEFAULT_EGRESS
    #: pip's index (``--index-url``); None: pip's default (PyPI).
    index_url: str | None = None
    limits: PrepareLimits = field(default_factory=PrepareLimits)
    python: str = sys.executable
    #: Where preparations run: None, a local sandbox; else a runner with ``run()`` (on
    #: Kubernetes, :class:`~.kube_prepare.PodRunner`: a pod).
    runner: Any = None

    def entry(self, link: RepoLink, commit: str) -> Path:
        return self.cache_root / repo_key(link.url) / commit

    def cached(self, link: RepoLink, commit: str) -> Prepared | None:
        return load(self.entry(link, commit))

    async def prepare(self, link: RepoLink, commit: str, emit: Emit) -> tuple[Prepared, bool]:
        """The prepared commit, and whether it came from the cache."""
        entry = self.entry(link, commit)
        entry.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        async with _locked(entry.parent / f"{commit}.lock", emit):
            try:
                found = load(entry)
            except UnusableRecord as exc:
                raise PreparationFailed(f"the prepared commit {commit[:12]} has an unusable "
                                        f"record ({exc}): an administrator removes "
                                        f"{entry.parent.name}/{commit} from the cache") from None
            if found is not None:
                return found, True
            began = time.monotonic()
            name = f"{entry.parent.name}-{commit[:12]}-{secrets.token_hex(4)}"
            work = self.cache_root / ".work" / name
            work.mkdir(mode=0o700, parents=True)
            try:
                record = await self._prepare(link, commit, work, emit)
                record["seconds"] = round(time.monotonic() - began, 3)
                data = json.dumps(record, indent=1, ensure_ascii=False).encode()
                if len(data) > RECORD_LIMIT:
                    raise PreparationFailed(f"what the repository asks for is too large to "
                                            f"keep: a record of {len(data)} bytes, at most "
                                            f"{RECORD_LIMIT}")  # fmt: skip
                (work / PREPARED).write_bytes(data)
                await _off_loop(seal.seal, work)
                os.rename(work, entry)
            finally:
                await asyncio.to_thread(shutil.rmtree, work, True)
            return Prepared(entry, record), False

    async def _prepare(self, link: RepoLink, commit: str, work: Path, emit: Emit) -> dict:
        emit("fetching", f"Fetching {link.url} at {commit[:12]}")
        await refs.fetch(link, commit, work / "repo")
        try:  # (its size is the repository's to choose, and dpkg-query runs: off the loop)
            wanted = await asyncio.to_thread(read_environment, work / "repo")
        except BadRepository as exc:
            raise PreparationFailed(str(exc)) from None
        for message in wanted.unsupported:
            emit("building", f"Not prepared: {message}")
        (work / "env").mkdir(mode=0o755)
        config = wanted.config_dir.relative_to(work / "repo")
        record: dict[str, Any] = {
            "url": link.url, "commit": commit, "requirements": wanted.requirements,
            "site": os.path.relpath(site_dir(ENV_PATH), ENV_PATH),
            "start": str(config / "start") if wanted.start else None,
            "unsupported": wanted.unsupported, "post_build": bool(wanted.post_build),
        }  # fmt: skip
        if not wanted.requirements and not wanted.post_build:
            emit("building", "Nothing to install: the repository asks for no packages")
            return record
        plan = {"prefix": ENV_PATH, "repo": REPO_PATH, "index_url": self.index_url,
                "requirements": None, "post_build": None,
                "env": {"HOME": REPO_PATH, "USER": "jovyan", "LANG": "C.UTF-8",
                        "PATH": "/usr/local/bin:/usr/bin:/bin",
                        "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
                        # postBuild can tell this preparation from repo2docker's build.
                        "JUPYTER_SANDBOX_PREPARE": "1"}}  # fmt: skip
        (work / "plan").mkdir(mode=0o755)
        if wanted.requirements:
            (work / "plan" / "requirements.txt").write_text("\n".join(wanted.requirements) + "\n")
            plan["requirements"] = f"{_PLAN_DIR}/requirements.txt"
        if wanted.post_build:
            _make_executable(work / "repo", str(config / "postBuild"))  # as repo2docker does
            plan["post_build"] = f"{REPO_PATH}/{config / 'postBuild'}"
        allow = Allowlist((*self.egress, *_host_entry(link.url), *_host_entry(self.index_url)))
        if self.runner is not None:
            code, denied = await self.runner.run(self, work, plan, allow, emit)
        else:
            code, denied = await self._run_sandbox(work, plan, allow, emit)
        if denied:
            emit("building", f"Refused by the egress allowlist: {', '.join(sorted(set(denied)))}")
        if code != 0:
            raise PreparationFailed(f"preparing the environment failed (exit code {code}); "
                                    "the log above says where")  # fmt: skip
        # At rest now: what it left, once more against the limits (its last second too).
        if problem := await _off_loop(self._over_limits, work, True):
            raise PreparationFailed(f"preparing used {problem}")
        # Where the preparation's Python put packages: what the sandbox wrote, so input.
        record["site"] = await _off_loop(seal.read_site, work / "env", SITE_FILE, record["site"])
        return record

    async def _run_sandbox(self, work: Path, plan: dict[str, Any], allow: Allowlist,
                           emit: Emit) -> tuple[int | None, list[str]]:  # fmt: skip
        (work / "plan" / "plan.json").write_text(
            json.dumps({**plan, "proxy_socket": f"{_EGRESS_DIR}/proxy.sock"}))
        runtime = create_runtime(self.runtime)
        runtime.require()
        who = identity.resolve()
        # The proxy's socket: in a short private directory (a socket's path is short).
        egress = Path(tempfile.mkdtemp(prefix="jupyter-sandbox-egress-"))
        for sub in (work / "repo", work / "env", egress):
            sub.mkdir(mode=0o700, exist_ok=True)
            if who.separate:
                filesystem.chown_tree(sub, who.uid, who.gid)
        proxy = EgressProxy(allow)
        await proxy.start(str(egress / "proxy.sock"))
        spec = self._spec(work, egress, runtime.name, who)
        emit("building", f"Preparing in a {runtime.name} sandbox (network: "
             f"{', '.join(allow.entries)} only)")  # fmt: skip
        code: int | None = None
        try:
            sandbox = await runtime.launch(spec)
            try:
                code = await self.watch(sandbox, spec.log_path, work, emit)
            finally:
                await sandbox.cleanup()
        finally:
            await proxy.close()
            shutil.rmtree(egress, ignore_errors=True)
            if who.separate:  # (ended: nothing of the sandbox uid writes there any more)
                await asyncio.to_thread(filesystem.chown_tree, work, os.getuid(), os.getgid())
        return code, proxy.denied

    async def watch(self, sandbox: Any, log: Path, work: Path, emit: Emit) -> int | None:
        """Stream the log until the sandbox ends; enforce the time, disk and file limits.

        The log is the file first found at ``log`` (a pod may replace the name with a link:
        it is read from the file opened then, never by the name again)."""
        deadline = time.monotonic() + self.limits.timeout
        next_disk = 0.0
        tail = untrusted.LogTail(log, self.limits.log_bytes)
        waiting = asyncio.ensure_future(sandbox.wait())
        try:
            while True:
                done = waiting.done()
                try:
                    for line in tail.lines(final=done):
                        emit("building", line)
                except untrusted.Refused as exc:
                    await sandbox.kill()
                    raise PreparationFailed(f"the preparation's log is refused: {exc}") from None
                if done:
                    return waiting.result()
                now = time.monotonic()
                if now > deadline:
                    await sandbox.kill()
                    raise PreparationFailed(f"preparing took longer than {self.limits.timeout:g}s")
                if now >= next_disk:
                    if problem := await _off_loop(self._over_limits, work, False):
                        await sandbox.kill()
                        raise PreparationFailed(f"preparing used {problem}")
                    next_disk = time.monotonic() + 1.0
                await asyncio.wait({waiting}, timeout=0.2)
        finally:
            waiting.cancel()
            tail.close()

    def _over_limits(self, work: Path, strict: bool) -> str | None:
        return seal.over_limits(work, self.limits.disk_bytes, self.limits.files, strict=strict)

    def _spec(
        self, work: Path, egress: Path, runtime: str, who: identity.SandboxIdentity
    ) -> SandboxSpec:
        inside_uid = identity.INSIDE_UID if runtime == "bubblewrap" else who.uid
        etc = filesystem.synthetic_etc(work / "etc", "binder", inside_uid, inside_uid,
                                       user="jovyan", home=REPO_PATH)  # fmt: skip
        runner, module_mounts = own_module(self.python, "sandbox_spawner.binder.inside")
        mounts = filesystem.build_mounts(
            python_paths=list(pyenv.python_dirs(self.python)),
            workspace=None, workspace_writable=True, scratch_dir=None, ipc_dir=None,
            connection_file=None, etc_mounts=etc,
            extra=[filesystem.ExtraMount(str(work / "repo"), REPO_PATH, True),
                   filesystem.ExtraMount(str(work / "env"), ENV_PATH, True),
                   filesystem.ExtraMount(str(egress), _EGRESS_DIR, True),
                   filesystem.ExtraMount(str(work / "plan"), _PLAN_DIR, False),
                   *module_mounts],
            hidden_paths=(),
        )  # fmt: skip
        (work / "state").mkdir(mode=0o700, exist_ok=True)
        return SandboxSpec(
            kernel_id=f"binder-{work.name}",
            argv=[*runner, f"{_PLAN_DIR}/plan.json"],
            env={"PATH": f"{os.path.dirname(self.python)}:/usr/bin:/bin", "LANG": "C.UTF-8",
                 "HOME": REPO_PATH},
            cwd=REPO_PATH,
            mounts=mounts,
            network=NetworkMode.NONE,
            limits=ResourceLimits(memory_bytes=self.limits.memory_bytes or None,
                                  cpus=self.limits.cpus or None,
                                  pids=self.limits.pids or None),
            state_dir=work / "state",
            log_path=work / "build.log",
            hostname="binder",
            identity=who if who.separate else None,
            host_sockets=True,  # the egress proxy's socket
        )


def repo_key(url: str) -> str:
    """A directory name for a repository: readable, and unique by its URL."""
    parts = urlsplit(url)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{parts.hostname}{parts.path}").strip("-.")
    return f"{readable[:60]}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def load(entry: Path) -> Prepared | None:
    """The prepared commit at ``entry``, None when there is none; :class:`UnusableRecord`
    when its record cannot be used: it is read by descriptor, never through a link, at most
    :data:`RECORD_LIMIT` bytes (the Hub reads it on its event loop)."""
    try:
        fd = untrusted.open_dir(entry)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnusableRecord(f"{entry.name}: {exc.strerror}") from None
    try:
        data = untrusted.read_file(fd, PREPARED, RECORD_LIMIT)
    except FileNotFoundError:
        return None
    except untrusted.Refused as exc:
        raise UnusableRecord(str(exc)) from None
    except OSError as exc:
        raise UnusableRecord(f"{PREPARED}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except ValueError:
        raise UnusableRecord(f"{PREPARED} is not JSON") from None
    if not isinstance(record, dict):
        raise UnusableRecord(f"{PREPARED} is not a record (a JSON object)")
    return Prepared(entry, record)


def _host_entry(url: str | None) -> list[str]:
    """The allowlist entry (``host:port``) for ``url``'s host; none for no URL."""
    parts = urlsplit(url or "")
    port = parts.port or {"https": 443, "http": 80, "git": 9418}.get(parts.scheme, 443)
    return [f"{parts.hostname}:{port}"] if parts.hostname else []


def _make_executable(repo: Path, path: str) -> None:
    """``chmod 755`` of the repository's file ``path``, reached through no link."""
    root = untrusted.open_dir(repo)
    try:
        fd = untrusted.open_beneath(root, path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
    finally:
        os.close(root)


async def _off_loop(work: Callable[..., Any], *args: Any) -> Any:
    """``work(*args)`` in a thread (it walks what the preparation wrote: any size); what it
    left unusable, as :class:`PreparationFailed`."""
    try:
        return await asyncio.to_thread(work, *args)
    except (seal.Unusable, untrusted.Refused) as exc:
        raise PreparationFailed(str(exc)) from None


@contextlib.asynccontextmanager
async def _locked(path: Path, emit: Emit):
    """An exclusive lock on ``path``, waited for without blocking the event loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    emit("waiting", "Another launch is preparing this commit; waiting for it")
                    told = True
                await asyncio.sleep(0.2)
        yield
    finally:
        os.close(fd)
