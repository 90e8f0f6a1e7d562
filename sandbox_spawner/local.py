"""``LocalSandboxSpawner``: each JupyterHub user's server in a sandbox on this machine.

JupyterHub on one machine usually means LocalProcessSpawner: users' code runs
on the host as system users. Here each user's ``jupyterhub-singleuser`` (and
every kernel and terminal it starts: the sandbox is the boundary, as a pod is
with KubeSpawner) runs in a gVisor or bubblewrap sandbox built by this
project's runtimes, from the same :class:`~sandbox_provisioner.spec.SandboxSpec`
and mount plan as sandboxed kernels:

* a persistent home per user on the host (``homes_root/<user>``), read-write as
  ``home_path`` (``/home/jovyan``, as in Jupyter's images); the system and
  Python read-only; a private ``/tmp``;
* its own host uid when the Hub is root (``uid_base`` + the user's id): what
  one user's code writes, reads or signals is that uid's, never another user's;
* no network but loopback (``network = "host"`` opts in): the server listens on
  a Unix socket, which the supervisor (:mod:`.supervisor`) carries from a
  loopback port for the proxy; the Hub API is reached through a second socket.
  No other host port is reachable: not the proxy's API, not another user's
  server;
* memory, CPU and process limits per user (``mem_limit``, ``cpu_limit``,
  ``pids_limit``; JupyterHub's ``group_overrides`` set them per group).

Under gVisor, a server is restored from a template (:mod:`.server_template`)
once one is built (in the background, after the first start): the home is at
the same destination, ``home_path``, for every user, so one template serves
all.

Each server has a supervisor process of its own, outside the Hub's process
tree: a Hub restart finds the servers running (``load_state``, ``poll``), and
stopping a server ends every process of its sandbox. Homes outlive servers;
``delete_home_on_user_delete`` removes one with its user.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from jupyter_server.serverapp import DEFAULT_JUPYTER_SERVER_PORT
from jupyterhub.spawner import Spawner
from jupyterhub.utils import random_port
from traitlets import Bool, CaselessStrEnum, Int, Unicode, default

from sandbox_provisioner import filesystem, identity, instance, pyenv, templates
from sandbox_provisioner.identity import SandboxIdentity
from sandbox_provisioner.launch.plan import RUNTIME_ENV, own_module
from sandbox_provisioner.limits import cgroup_processes, cgroup_relpath, end_cgroup_dirs
from sandbox_provisioner.runtimes import AUTO, create_runtime, runtime_classes
from sandbox_provisioner.runtimes.process import is_running, process_start_time
from sandbox_provisioner.spec import NetworkMode, ResourceLimits, SandboxSpec

from . import activity, data_root, freezing, remove_aside, supervisor
from .activity import ActivityKey
from .binder import server as binder_server
from .binder.inside import ENV_PATH
from .hibernation import KeepsMemory
from .hub_instance import HubConflict, HubInstance, claim, legacy_slug, server_key, slug
from .starts import RecordsStarts
from .streams import open_own_unix_connection

#: Inside every user's sandbox: the run directory (the server's and the Hub API's sockets).
RUN_DIR = "/run/jupyter-sandbox"
SERVER_SOCKET, HUB_SOCKET = "server.sock", "hub.sock"
#: The longest path a Unix socket may have (sun_path, without its final NUL).
MAX_SOCKET_PATH = 107
#: The server's configuration inside the sandbox (read-only).
SERVER_CONFIG = "/etc/jupyter-sandbox/jupyter_server_config.py"
#: gVisor: the control directory a server restored from a template reads its start from.
SERVER_CTL = "/run/jupyter-sandbox-ctl"
TEMPLATE_RUNNER = "sandbox_spawner.server_template"
_ENV_PASSED = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ")


#: How users read the runtimes' names.
RUNTIME_LABELS = {"gvisor": "gVisor", "bubblewrap": "bubblewrap"}


def _server_config(project: str | None, label: str) -> str:
    """The server's configuration; ``project``: this project's checkout, when Python does
    not cover it (the server imports :mod:`.activity` from there, read-only); ``label``:
    the sandbox, as its kernels' names say it (:mod:`.kernel_labels`)."""
    path = f"import sys\nsys.path.insert(0, {project!r})\n" if project else ""
    return (
        "# Written by LocalSandboxSpawner: the user's server inside its sandbox.\n"
        f"{path}"
        f"c.ServerApp.sock = {RUN_DIR + '/' + SERVER_SOCKET!r}\n"
        "c.ServerApp.sock_mode = '0600'\n"
        "# Kernels and terminals run in this sandbox, as plain processes: it is the boundary.\n"
        "c.KernelSpecManager.allowed_kernelspecs = {'python3'}\n"
        "c.MappingKernelManager.default_kernel_name = 'python3'\n"
        "c.ServerApp.kernel_spec_manager_class = "
        "'sandbox_spawner.kernel_labels.SandboxedKernelSpecManager'\n"
        f"c.SandboxedKernelSpecManager.label = {label!r}\n"
    )


class LocalSandboxSpawner(KeepsMemory, RecordsStarts, ActivityKey, Spawner):
    """Each user's server in a local sandbox (gVisor or bubblewrap)."""

    runtime = Unicode(
        AUTO, config=True, help="'auto' (gVisor when it works here, else bubblewrap), "
        "'gvisor' or 'bubblewrap'."
    )  # fmt: skip
    homes_root = Unicode(config=True, help="Where users' homes are kept on the host.")
    state_root = Unicode(
        config=True, help="Where each server's supervisor keeps its state (sockets, logs)."
    )
    network = CaselessStrEnum(
        [m.value for m in NetworkMode], default_value=NetworkMode.NONE.value, config=True,
        help="'none': loopback inside the sandbox only. 'host': the host's network (opt-in).",
    )  # fmt: skip
    pids_limit = Int(1024, config=True, help="Processes and threads per server; 0 = none.")
    uid_base = Int(
        None, allow_none=True, config=True,
        help="With the Hub as root, each account's server runs as a host uid of its own, "
        "from a range of 2**20 that starts at uid_base (uids no account of the system "
        "has), never given to another account. None (the default): the range this Hub "
        "had, else the first one from 1000000000 that no other Hub on this machine holds. "
        "A range another Hub holds is refused. Without root, every server runs as the "
        "Hub's uid.",
    )  # fmt: skip
    delete_home_on_user_delete = Bool(
        False, config=True, help="Remove a user's home when the user is deleted."
    )
    stop_grace = Int(5, config=True, help="Seconds between SIGTERM and SIGKILL on stop.")
    home_path = Unicode("/home/jovyan", config=True, help="Where a user's home is inside.")
    server_templates = Bool(
        True, config=True,
        help="gVisor: restore servers from a checkpoint of one that imported everything "
        "(built in the background after the first start).",
    )  # fmt: skip

    hibernation_images = Unicode(
        config=True, help="gVisor: where servers hibernated with their memory are kept "
        "(root's alone: an image holds the server's memory and token).",
    )  # fmt: skip
    hibernation_image_limit = Int(
        0, config=True, help="gVisor: the largest image of a hibernated server, in bytes; "
        "a larger one is removed and the server stopped instead. 0: the server's memory "
        "limit (mem_limit), or 4 GiB without one.",
    )  # fmt: skip

    binder_cache = Unicode(
        config=True, help="Where Binder launches' prepared environments are (the Hub "
        "service's --binder-cache): a launch's server uses one of them, read-only.",
    )  # fmt: skip

    @default("binder_cache")
    def _default_binder_cache(self) -> str:
        return str(data_root() / "binder")

    @default("hibernation_images")
    def _default_hibernation_images(self) -> str:
        return str(data_root() / "hibernated")

    @default("homes_root")
    def _default_homes_root(self) -> str:
        return str(data_root() / "homes")

    @default("state_root")
    def _default_state_root(self) -> str:
        return str(data_root() / "servers")

    # Users' servers must outlive a restarted Hub, and keep their API token when stopped.
    will_resume = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.supervisor_pid: int | None = None
        self.supervisor_start: int | None = None
        self.state_dir: str = ""
        self.activity_port = 0
        self._process: subprocess.Popen | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._binder: binder_server.BinderServer | None = None
        #: Whether the server, stopped, left an image of its memory (the hibernator's count).
        self.image_kept = False

    # -- where things are ------------------------------------------------------------------
    #: Each Hub's instance (its id, its uids), by state root: claimed on first use.
    _instances: dict[tuple[str, int | None], HubInstance] = {}

    @property
    def instance(self) -> HubInstance:
        key = (os.path.abspath(self.state_root), self.uid_base)
        if key not in self._instances:
            registry = data_root() / "hubs" if os.geteuid() == 0 else None
            self._instances[key] = claim(self.state_root, self.homes_root, self.uid_base,
                                         registry)  # fmt: skip
            found = self._instances[key]
            self.log.info("this Hub's sandboxes: instance %s, host uids from %s", found.id,
                          found.uid_base if found.uid_base is not None else "(not root)")
        return self._instances[key]

    @property
    def user_slug(self) -> str:
        return slug(self.user.name)

    @property
    def home(self) -> Path:
        return Path(self.homes_root) / self.user_slug

    @property
    def inside_home(self) -> str:
        return self.home_path

    def _state_dir(self) -> Path:
        """The server's own directory (by the user's id: short, as a socket's path must be)."""
        return Path(self.state_root) / f"{self.user.id}-{server_key(self.name)}"

    def identity(self) -> SandboxIdentity:
        """The server's host uid: its own, when the Hub is root (this Hub's alone)."""
        if os.geteuid() != 0:
            return identity.resolve()
        created = self.user.created.isoformat() if self.user.created else ""
        uid = self.instance.account_uid(self.user.name, created, int(self.user.id), self.home)
        return SandboxIdentity(uid, uid, 0, 0)

    # -- JupyterHub's spawner contract ----------------------------------------------------
    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.supervisor_pid = state.get("supervisor_pid")
        self.supervisor_start = state.get("supervisor_start")
        self.state_dir = state.get("state_dir", "")
        self.port = state.get("port", 0)
        self.activity_port = state.get("activity_port", 0)
        self.image_kept = bool(state.get("image_kept"))

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.supervisor_pid:
            state["supervisor_pid"] = self.supervisor_pid
            state["supervisor_start"] = self.supervisor_start
            state["state_dir"] = self.state_dir
            state["port"] = self.port
            if self.activity_port:  # the hibernator's: its port, and the supervisor's socket
                state["activity_port"] = self.activity_port
                state["freezer"] = str(Path(self.state_dir) / freezing.SOCKET)
        if self.image_kept:  # kept across stops: the server hibernated with its memory
            state["image_kept"] = True
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.supervisor_pid = self.supervisor_start = None

    async def start(self) -> str:
        began, resumed = time.monotonic(), self.home.exists()
        self.new_activity_key()
        self.image_kept = False
        self._events = asyncio.Queue()
        self._event(10, "Preparing the home directory")
        self._binder = binder_server.from_user_options(self.user_options or {},
                                                       Path(self.binder_cache))  # fmt: skip
        who = self.identity()
        self._prepare_home(who)
        home = await self._binder.copy_for(self.home, who.uid, who.gid) if self._binder else None
        state = self._state_dir()
        longest = len(os.fsencode(state / "run" / SERVER_SOCKET))
        if longest > MAX_SOCKET_PATH:
            raise ValueError(f"{state}/run/{SERVER_SOCKET} is {longest} bytes long, more than "
                             f"a Unix socket's path may be ({MAX_SOCKET_PATH}): set "
                             "c.LocalSandboxSpawner.state_root to a shorter directory")  # fmt: skip
        if supervisor.holds(state):
            raise HubConflict(f"a server of {self.user.name} still runs from {state} (its "
                              "supervisor holds it): stop it first")  # fmt: skip
        await remove_aside(state)
        run = state / "run"
        for directory in (Path(self.state_root), state):
            directory.mkdir(mode=0o711, parents=True, exist_ok=True)
        run.mkdir(mode=0o700)
        os.chown(run, who.uid, who.gid)
        (state / "ctl").mkdir(mode=0o700)
        port = random_port()
        self.port = port
        while (activity_port := random_port()) == port:
            continue
        self.activity_port = activity_port
        self.server.port, self.server.ip = port, "127.0.0.1"
        runtime = create_runtime(self.runtime)
        runtime.require()
        image, kept = self._image_dir(), self._image_record(who)
        record = await self._hibernated(image, kept) if runtime.name == "gvisor" else None
        spec = self._spec(state, runtime.name, who, home=home)
        template = None
        # A launched repository's servers share a template of their own (one more mount);
        # one with a start script runs it before the server: it starts cold.
        if runtime.name == "gvisor" and self.server_templates and not (
            self._binder and self._binder.prepared.record.get("start")
        ):  # fmt: skip
            template = self._template(spec, runtime, who)
            if template is not None:
                self._write_start(state, spec, who)
                spec = dataclasses.replace(spec, switches_user=True)
        if record is not None and not await self._same_sandbox(record, spec, image):
            record = None
        plan = {
            "name": self.user.name + (f"/{self.name}" if self.name else ""),
            "runtime": runtime.name,
            "spec": spec.to_dict(),
            "port": port,
            "activity_port": activity_port,
            "server_socket": str(run / SERVER_SOCKET),
            "hub_socket": str(run / HUB_SOCKET),
            "hub_api": self._hub_api_address(),
            "stop_grace": self.stop_grace,
            "restore_from": str(template.image) if template is not None else None,
            # gVisor: where the hibernator may have it hibernated with its memory ...
            "image": {"dir": str(image), "limit": self._image_limit(), "record": kept}
            if runtime.name == "gvisor" else None,
            # ... and the image it restores from, if it was.
            "resume": {"dir": str(image), "spec": record["spec"], "pid": record["pid"]}
            if record is not None else None,
        }  # fmt: skip
        fd = os.open(state / supervisor.PLAN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(plan, f)  # it holds the server's Hub token: never on a command line
        how = " (restored from a template)" if template is not None else ""
        if record is not None:
            self._event(30, "Restoring the server as it was when it hibernated, kernels and all")
        else:
            self._event(30, f"Starting the server in a {runtime.name} sandbox{how}")
        with open(state / supervisor.LOG, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "sandbox_spawner.supervisor", str(state)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # it outlives the Hub: no signal of the Hub's reaches it
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd="/",
            )  # fmt: skip
        self.supervisor_pid = self._process.pid
        self.supervisor_start = process_start_time(self._process.pid)
        self.state_dir = str(state)
        self._event(60, "Waiting for the server to answer")
        await self._wait_for_server(run / SERVER_SOCKET)
        restored = record is not None and await self._restored(state, image)
        back = "back as it was when it hibernated, kernels and all" if restored else "up"
        self._event(100, f"The server is {back}: {self._sandbox_summary(runtime.name, spec)}")
        self.record_start(began, resumed, restored)
        return f"http://127.0.0.1:{port}"

    def activity_url(self) -> str | None:
        """The hibernator asks at the supervisor's port for it (:mod:`.freezing`): asking
        neither thaws a frozen server nor counts as the proxy's traffic."""
        if not self.activity_port or self.server is None:
            return super().activity_url()
        return f"http://127.0.0.1:{self.activity_port}{self.server.base_url}{activity.PATH}"

    def _sandbox_summary(self, runtime: str, spec: SandboxSpec) -> str:
        """What the user's server runs in, as the spawn page says it."""
        limits = spec.limits
        parts = [f"{limits.memory_bytes / 2**30:g} GiB of memory" if limits.memory_bytes
                 else "no memory limit",
                 f"{limits.cpus:g} CPU" if limits.cpus else "no CPU limit",
                 f"{limits.pids} processes" if limits.pids else "no process limit",
                 "no network" if spec.network is NetworkMode.NONE else "the host's network"]
        return f"a {RUNTIME_LABELS.get(runtime, runtime)} sandbox, {', '.join(parts)}"

    async def get_url(self) -> str:
        """Where the proxy reaches the server: its supervisor's port on loopback (asked by a
        restarted Hub)."""
        return f"http://127.0.0.1:{self.port}{self.server.base_url if self.server else ''}"

    async def poll(self) -> int | None:
        if not self.supervisor_pid:
            return 0
        if self._process is not None and self._process.poll() is None:
            return None
        if self._process is None and is_running(self.supervisor_pid, self.supervisor_start):
            return None
        await self._end_sandbox()  # the Hub stops a server found dead without calling stop
        return self._exit_code()

    async def stop(self, now: bool = False) -> None:
        pid, started = self.supervisor_pid, self.supervisor_start
        if not pid:
            return
        if is_running(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace + 15
            while is_running(pid, started) and time.monotonic() < deadline:
                if self._process is not None:
                    self._process.poll()
                await asyncio.sleep(0.05)
            if is_running(pid, started):  # its sandbox dies with it (parent-death signal)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
        self._process = None
        await self._end_sandbox()

    async def _end_sandbox(self) -> None:
        """Whatever is left of the server's sandbox once its supervisor is gone: nothing,
        unless the supervisor was killed (or died) while the sandbox was frozen, when its
        processes wait, frozen, holding their memory, for a signal they cannot take. Its
        groups (bubblewrap's, runsc's) are named for this server alone. Notes whether it
        left a hibernation image (the hibernator counts those)."""
        self.image_kept = self._image_dir().is_dir()
        name = self.instance.sandbox_name(int(self.user.id), server_key(self.name))
        runtimes = [r for r in runtime_classes().values() if r.local]
        for group in sorted({cgroup_relpath(r.cgroup_name(name)) for r in runtimes}):
            if cgroup_processes(group):
                self.log.warning("ending what is left of %s's sandbox (%s)", self.user.name,
                                 group)  # fmt: skip
                await end_cgroup_dirs(group, timeout=1)

    async def progress(self):  # type: ignore[override]
        while True:
            event = await self._events.get()
            yield event
            if event["progress"] >= 100:
                return

    async def delete_forever(self) -> None:
        await remove_aside(self._state_dir())
        await remove_aside(self._image_dir())
        options = (self.user_options or {}).get(binder_server.OPTION)
        if isinstance(options, dict) and options.get("anonymous"):
            await remove_aside(self.home)  # a launch's temporary user: all goes
        elif self.delete_home_on_user_delete and not self.name:  # named servers share the home
            await remove_aside(self.home)

    def _user_names(self) -> list[str]:
        from jupyterhub import orm

        return [name for (name,) in self.user.db.query(orm.User.name)]

    # -- the sandbox ----------------------------------------------------------------------
    def _prepare_home(self, who: SandboxIdentity) -> None:
        """The user's home: made (theirs) if new; refused if it belongs to another uid (an
        earlier account of this name, a copy): ownership is never "repaired" to whoever
        starts now. A home made under the old escaping of names moves to its new name."""
        home = self.home
        Path(self.homes_root).mkdir(mode=0o711, parents=True, exist_ok=True)
        self._move_legacy_home(who)
        try:
            home.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.lchown(home, who.uid, who.gid)
        except FileExistsError:
            pass
        found = os.lstat(home)
        if not stat.S_ISDIR(found.st_mode):
            raise HubConflict(f"the home {home} of {self.user.name} is not a directory: an "
                              "administrator must move it away")  # fmt: skip
        if os.geteuid() == 0 and found.st_uid != who.uid:
            raise HubConflict(
                f"the home {home} of {self.user.name} belongs to uid {found.st_uid}, not to "
                f"this user's uid {who.uid} (an earlier account of this name, or another "
                "Hub's?). Nothing was changed. If it is this user's, an administrator gives it "
                f"to them: chown -R --from={found.st_uid} {who.uid}:{who.gid} {home}"
            )  # fmt: skip

    def _move_legacy_home(self, who: SandboxIdentity) -> None:
        """A home made under the old escaping (which gave "josé" and "jos-e9-" one home)
        moves to the user's new name when it is surely theirs: owned by their uid (root),
        or (without root) no other user of this Hub had that old name."""
        old = Path(self.homes_root) / legacy_slug(self.user.name)
        if old == self.home or os.path.lexists(self.home):
            return
        try:
            found = os.lstat(old)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(found.st_mode):
            return
        if os.geteuid() == 0:
            theirs = found.st_uid == who.uid
        else:
            theirs = [legacy_slug(n) for n in self._user_names()].count(old.name) == 1
        if theirs:
            os.rename(old, self.home)
            self.log.info("moved the home of %s from %s to %s", self.user.name, old, self.home)
        else:
            self.log.warning("%s may be the home of %s under its old name; it is not surely "
                             "theirs, so it stays where it is", old, self.user.name)  # fmt: skip

    def _spec(
        self, state: Path, runtime: str, who: SandboxIdentity, home: Path | None = None
    ) -> SandboxSpec:
        """The server's sandbox; ``state`` holds its own files (run, ctl, etc, config). Under
        gVisor every server has the control directory a template restore reads from, so
        that all of them, and the template, are laid out alike."""
        python = sys.executable
        # This project's packages, read-only, when they are a checkout: the server imports
        # its activity extension, and a gVisor template's runner is this project's.
        project = own_module(python, TEMPLATE_RUNNER)[1]
        # Under gVisor: the control directory, in every server, so that all are laid out
        # as the template.
        ctl = [filesystem.ExtraMount(str(state / "ctl"), SERVER_CTL, True)]
        inside_uid = identity.INSIDE_UID if runtime == "bubblewrap" else who.uid
        config = state / "jupyter_server_config.py"
        config.write_text(_server_config(pyenv.own_package_root(pyenv.python_dirs(python)),
                                         RUNTIME_LABELS.get(runtime, runtime)))  # fmt: skip
        etc = filesystem.synthetic_etc(state / "etc", "jupyter", inside_uid, inside_uid,
                                       user=self.user_slug, home=self.inside_home,
                                       shell="/bin/bash")  # fmt: skip
        mounts = filesystem.build_mounts(
            python_paths=list(pyenv.python_dirs(python)),
            workspace=None,
            workspace_writable=True,
            scratch_dir=None,
            ipc_dir=None,
            connection_file=None,
            etc_mounts=[*etc, filesystem.Mount(SERVER_CONFIG, source=str(config))],
            extra=[
                filesystem.ExtraMount(str(home or self.home), self.inside_home, True),
                filesystem.ExtraMount(str(state / "run"), RUN_DIR, True),
                *project,
                *(ctl if runtime == "gvisor" else []),
                *(self._binder.mounts() if self._binder else []),
            ],
            hidden_paths=(),
        )
        limits = ResourceLimits(
            memory_bytes=int(self.mem_limit) if self.mem_limit else None,
            cpus=self.cpu_limit or None,
            pids=self.pids_limit or None,
        )
        argv = [python, "-m", "jupyterhub.singleuser", f"--config={SERVER_CONFIG}",
                f"--ServerApp.root_dir={self.inside_home}", *self.get_args()]  # fmt: skip
        env = self._env(python)
        if self._binder is not None:
            argv = self._binder.argv(argv, self.inside_home)
            env.update(self._binder.env(), PATH=f"{ENV_PATH}/bin:{env['PATH']}")
            if self._binder.anonymous:  # a launch's temporary user arrives with a token
                env["JUPYTERHUB_ALLOW_TOKEN_IN_URL"] = "1"
        return SandboxSpec(
            kernel_id=self.instance.sandbox_name(int(self.user.id), server_key(self.name)),
            argv=argv,
            env=env,
            cwd=self.inside_home,
            mounts=mounts,
            network=NetworkMode(self.network),
            limits=limits,
            state_dir=state,
            log_path=state / "server.log",
            hostname="jupyter",
            identity=who if who.separate else None,
            host_sockets=True,  # the Hub API's socket, made by the supervisor
        )

    # -- gVisor templates ------------------------------------------------------------------
    @staticmethod
    def _layout_key(spec: SandboxSpec) -> str:
        """What a restore must match: mount destinations and kinds, the Python, limits."""
        layout = [[m.target, m.kind.value, m.writable] for m in spec.mounts]
        limits = [spec.limits.memory_bytes, spec.limits.cpus, spec.limits.pids]
        data = json.dumps([layout, spec.argv[0], spec.network.value, limits, spec.hostname])
        return hashlib.sha256(data.encode()).hexdigest()[:24]

    def _template(self, spec: SandboxSpec, runtime: Any, who: SandboxIdentity) -> Any:
        """The ready template for this layout; else None, and one is built (once)."""
        key = self._layout_key(spec)
        found = templates.ready_template(key)
        if found is not None:
            return found
        root = instance.directory(self.state_root) / "templates"

        async def build(template: templates.Template) -> None:
            tdir = template.directory / "sandbox"
            for sub in ("run", "ctl", "home"):
                (tdir / sub).mkdir(parents=True, mode=0o700)
            runner, _ = own_module(spec.argv[0], TEMPLATE_RUNNER)
            built = dataclasses.replace(
                self._spec(tdir, "gvisor", who, home=tdir / "home"),
                kernel_id=f"server-template-{root.parent.name}-{key}",
                argv=[*runner, SERVER_CTL],
                env={"PATH": spec.env["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"},
                identity=None,
                switches_user=True,
            )
            sandbox = await runtime.launch(built)
            try:
                alive = lambda: _alive(sandbox)  # noqa: E731
                await templates.wait_for_file(tdir / "ctl" / "ready", alive, 240)
                await runtime.checkpoint(sandbox, template.image)
            except Exception as exc:
                output = (tdir / "server.log").read_bytes()[-1500:].decode(errors="replace")
                raise RuntimeError(f"{exc}; its output: {output.strip() or '(none)'}") from None
            finally:
                await sandbox.cleanup()
                shutil.rmtree(tdir, ignore_errors=True)

        templates.ensure_template(key, root, build, self.log)
        return None

    def _write_start(self, state: Path, spec: SandboxSpec, who: SandboxIdentity) -> None:
        """What a restored template needs to become this user's server (mode 0600)."""
        ctl = state / "ctl"
        start = {"uid": who.uid, "gid": who.gid, "env": spec.env, "cwd": spec.cwd,
                 "args": spec.argv[3:]}  # fmt: skip
        fd = os.open(ctl / "start.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(start, f)

    def _env(self, python: str) -> dict[str, str]:
        """JupyterHub's variables for the server (its token, its URLs), the Hub API through
        the run directory's socket, and nothing else of the Hub's environment."""
        hub = self.get_env()
        api = f"http+unix://{quote(RUN_DIR + '/' + HUB_SOCKET, safe='')}/hub/api"
        env = {k: v for k, v in hub.items()
               if k.startswith(("JUPYTERHUB_", "JPY_")) or k == activity.KEY_ENV}  # fmt: skip
        env.update({k: hub[k] for k in _ENV_PASSED if k in hub})
        for key in ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL"):
            if key in env:
                path = urlparse(env[key]).path.removeprefix("/hub/api")
                env[key] = api + path
        if "JUPYTERHUB_SERVICE_URL" in env:
            # The server listens on its socket only; jupyter_server takes a socket only with
            # its default port in place (the singleuser extension reads the port from here).
            env["JUPYTERHUB_SERVICE_URL"] = urlparse(env["JUPYTERHUB_SERVICE_URL"])._replace(
                netloc=f"127.0.0.1:{DEFAULT_JUPYTER_SERVER_PORT}").geturl()  # fmt: skip
        env.update(
            HOME=self.inside_home,
            USER=self.user_slug,
            SHELL="/bin/bash",
            PATH=f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
            TMPDIR="/tmp",
        )
        env[RUNTIME_ENV] = "hub"
        return env

    def _hub_api_address(self) -> list[Any]:
        url = urlparse(self.hub.api_url)
        return [url.hostname or "127.0.0.1", url.port or 80]

    async def _wait_for_server(self, sock: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # the socket node itself, never a link
                _, writer = await open_own_unix_connection(str(sock))
                writer.close()
                return
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"the sandboxed server of {self.user.name} exited while "
                                   f"starting. Its output:\n{self._log_tail()}")  # fmt: skip
            await asyncio.sleep(0.1)
        await self.stop(now=True)
        raise TimeoutError(f"the sandboxed server of {self.user.name} did not answer within "
                           f"{self.start_timeout}s. Its output:\n{self._log_tail()}")  # fmt: skip

    def _log_tail(self, size: int = 3000) -> str:
        """The end of the server's output: only the end is read (the server writes its log,
        and can make it as long, or as sparse, as it likes)."""
        parts = []
        for name in ("server.log", supervisor.LOG):
            with contextlib.suppress(OSError), open(Path(self.state_dir) / name, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                parts.append(f.read(size).decode(errors="replace"))
        return "\n".join(p.strip() for p in parts if p.strip()) or "(no output)"

    def _exit_code(self) -> int:
        try:
            return int((Path(self.state_dir) / supervisor.EXIT).read_text())
        except (OSError, ValueError):
            return 0

    def _event(self, progress: int, message: str) -> None:
        self.log.info("%s: %s", self._log_name, message)
        self._events.put_nowait({"progress": progress, "message": message})


async def _alive(sandbox: Any) -> bool:
    return await sandbox.poll() is None
