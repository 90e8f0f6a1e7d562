"""The ``sandbox-provisioner``: jupyter_client's kernel provisioner for sandboxed kernels.

A kernelspec selects it with ``metadata.kernel_provisioner.provisioner_name =
"sandbox-provisioner"``; its ``config`` sets this class's traits (they can
also be set for every kernel as ``c.SandboxProvisioner.<trait>``).

Launch, in jupyter_client's order:

* ``pre_launch`` picks the runtime (failing, with what to install, if it
  cannot run here), makes the kernel's private directory and writes the
  connection file for ZMQ IPC sockets inside it.
* ``launch_kernel`` builds the :class:`~sandbox_provisioner.spec.SandboxSpec`
  (command, filtered environment, mounts, limits) and gets the kernel a
  sandbox one of four ways (``launch/``): a local warm pool's, a gVisor
  template's restore, a claimed Sandbox on a cluster, or a cold boot here; it
  waits, up to ``launch_timeout``, until the kernel has opened its sockets. A
  sandbox that dies or hangs on the way gives an error with the kernel's last
  output and leaves nothing behind.
* ``poll``/``wait``/``send_signal``/``terminate``/``kill``/``cleanup`` act on
  the sandbox through the runtime interface, which is all this module knows.
  Sandboxes driven by a kernel agent (pooled, claimed) restart in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import (
    Bool,
    CaselessStrEnum,
    Float,
    Int,
    List,
    TraitError,
    Unicode,
    Union,
    default,
    validate,
)

from . import filesystem, identity, pool, pyenv, templates
from .launch.plan import SandboxPlan, SandboxStartError, normalized
from .launch.pooled import PooledLaunch
from .launch.remote import RemoteLaunch
from .launch.template import TemplateLaunch
from .limits import parse_size
from .runtimes import (
    AUTO,
    Sandbox,
    SandboxRuntime,
    banner_arguments,
    create_runtime,
    history_arguments,
    known_names,
    runtime_classes,
)
from .spec import NetworkMode, WorkspaceMode

#: Environment variables a kernel gets from the server's environment by default.
DEFAULT_ENV_ALLOWLIST = ("LANG", "LANGUAGE", "LC_*", "TZ", "JPY_SESSION_NAME")

_LOG_TAIL = 2000


#: A kernel id becomes the name of a directory (removed with its kernel), of cgroups and
#: of a container. jupyter_server lets a client choose it (``POST /api/kernels`` with
#: ``kernel_id``); its own are UUIDs.
_KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
#: The names of the sandboxes this project makes itself (a Hub's servers and their
#: templates, pools, templates, Binder preparations; runsc's ``kernel-`` container ids):
#: a client's kernel id that took one would share its cgroups (and be taken for it).
RESERVED_PREFIXES = ("hub-", "kernel-", "server-template-", "template-", "pool-", "binder-")


def check_kernel_id(kernel_id: str) -> None:
    """Refuse a kernel id that is no plain name (``..`` made the kernel's directory the
    state root's parent, ``/tmp``, which a failed start then removed whole), or that
    takes the name of a sandbox of this project's own."""
    if not _KERNEL_ID.fullmatch(kernel_id):
        raise SandboxStartError(f"kernel id {kernel_id[:120]!r} refused: a kernel id is "
                                "letters, digits, '-' and '_' (at most 100), as "
                                "jupyter_server's UUIDs are")  # fmt: skip
    if kernel_id.lower().startswith(RESERVED_PREFIXES):
        raise SandboxStartError(f"kernel id {kernel_id!r} refused: it begins as the names "
                                "of this project's own sandboxes do "
                                f"({', '.join(RESERVED_PREFIXES)})")  # fmt: skip


class SandboxProvisioner(  # type: ignore[misc]
    SandboxPlan, PooledLaunch, TemplateLaunch, RemoteLaunch, KernelProvisionerBase
):
    """Runs each kernel in a sandbox of the configured runtime."""

    runtime = Unicode(
        AUTO,
        config=True,
        help="Isolation runtime: 'auto' (the strongest available), 'gvisor' or 'bubblewrap'.",
    )
    workspace = CaselessStrEnum(
        [m.value for m in WorkspaceMode],
        default_value=WorkspaceMode.NOTEBOOK.value,
        config=True,
        help="Host directory the kernel works in: 'notebook' (its directory, read-write), "
        "'notebook-readonly', 'root' (the server's root directory, read-write) or "
        "'scratch' (an empty private directory).",
    )
    network = CaselessStrEnum(
        [m.value for m in NetworkMode],
        default_value=NetworkMode.NONE.value,
        config=True,
        help="'none': loopback inside the sandbox only. 'host': the host's network (opt-in).",
    )
    env_allowlist = List(
        Unicode(),
        default_value=list(DEFAULT_ENV_ALLOWLIST),
        config=True,
        help="Names (fnmatch patterns) of server environment variables passed to the kernel. "
        "Variables in the kernelspec's env are always passed.",
    )
    extra_mounts = List(
        Unicode(),
        config=True,
        help="More host paths in the sandbox, each 'HOST[:SANDBOX][:ro|rw]' (read-only default).",
    )
    hidden_paths = List(
        Unicode(),
        default_value=list(filesystem.DEFAULT_HIDDEN_PATHS),
        config=True,
        help="Host paths (globs, ~ expanded) hidden wherever a bound directory contains them. "
        "Jupyter's own config, data and runtime directories are always hidden.",
    )
    workspace_readonly = List(
        Unicode(),
        default_value=list(filesystem.DEFAULT_WORKSPACE_READONLY),
        config=True,
        help="Paths relative to a writable workspace that stay read-only (e.g. '.git').",
    )
    etc_allowlist = List(
        Unicode(),
        default_value=list(filesystem.DEFAULT_ETC_ALLOWLIST),
        config=True,
        help="Host files under /etc visible (read-only) in the sandbox.",
    )
    memory_limit = Union(
        [Int(), Unicode()],
        default_value="4G",
        config=True,
        help="Memory limit of the whole sandbox, bytes or '512M'/'2G'; 0 = none.",
    )
    cpu_limit = Float(0.0, config=True, help="CPU limit in cores (0.5 = half a core); 0 = none.")
    sandbox_user = Unicode(
        "auto",
        config=True,
        help="With the server as root: the unprivileged account (name or uid) kernels run as "
        "and that owns the files they create. 'auto': the jupyter-sandbox account, else uid "
        f"{identity.FALLBACK_UID}. An unprivileged server's kernels always run as itself.",
    )
    pids_limit = Int(512, config=True, help="Maximum processes and threads; 0 = none.")
    launch_timeout = Float(
        60.0,
        config=True,
        help="Seconds to wait for the sandboxed kernel to open its sockets before giving up.",
    )
    pool_size = Int(
        0,
        config=True,
        help="Sandboxes of this kernelspec kept started ahead, with ipykernel imported, so a "
        "kernel starts warm (runtimes that can bind a workspace late: bubblewrap). 0 = none.",
    )
    pool_preload = List(
        Unicode(),
        config=True,
        help="More modules pooled sandboxes import ahead (e.g. 'numpy', 'pandas').",
    )
    pool_root = Unicode(
        config=True,
        help="Pooled sandboxes can serve workspaces under this directory (default: the "
        "server's root directory, else the current one); others start cold.",
    )
    snapshot_templates = Bool(
        True,
        config=True,
        help="gVisor: restore kernels from a checkpoint of a template sandbox that imported "
        "ipykernel already, one per filesystem layout (built after the first cold start).",
    )
    max_templates = Int(
        4,
        config=True,
        help="gVisor: at most this many templates per server (one per filesystem layout: a "
        "notebook directory and its options; each an image of about 10 MB built with a few "
        "seconds of CPU); the least recently used is removed to make room. 0: no limit.",
    )
    state_root = Unicode(
        config=True,
        help="Host directory holding each kernel's private directory (sockets, logs). "
        "Kept short: socket paths are limited to 107 bytes.",
    )

    @default("state_root")
    def _default_state_root(self) -> str:
        return os.path.join(tempfile.gettempdir(), f"jupyter-sandbox-{os.getuid()}")

    # -- validation: every bad value is an error naming the option -------------------------
    def __init__(self, **kwargs: Any):
        base = {"kernel_id", "kernel_spec", "parent", "config", "log", "connection_info"}
        mine = set(self.class_trait_names(config=True))
        runtime_cls = runtime_classes().get(str(kwargs.get("runtime", "")).strip().lower())
        theirs = set(runtime_cls.class_trait_names(config=True)) - mine if runtime_cls else set()
        unknown = sorted(set(kwargs) - base - mine - theirs)
        if unknown:
            raise TraitError(
                f"unknown sandbox-provisioner option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(mine | theirs))}"
            )
        #: Options of the runtime itself (e.g. the kubernetes runtime's warm_pool).
        self._runtime_options = {k: kwargs.pop(k) for k in list(kwargs) if k in theirs}
        super().__init__(**kwargs)
        self._sandbox: Sandbox | None = None
        self._runtime: SandboxRuntime | None = None
        self._exited = False
        self._stop_requested = False
        self._workspace_host: str | None = None

    @validate("runtime")
    def _check_runtime(self, proposal: Any) -> str:
        name = proposal["value"].strip().lower()
        if name not in known_names():
            raise TraitError(
                f"unknown sandbox runtime {proposal['value']!r}; "
                f"choose one of: {', '.join(known_names())}"
            )
        return name

    @validate("sandbox_user")
    def _check_sandbox_user(self, proposal: Any) -> str:
        try:
            identity.resolve(proposal["value"])
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        return proposal["value"]

    @validate("memory_limit")
    def _check_memory(self, proposal: Any) -> int | str:
        try:
            parse_size(proposal["value"], "memory_limit")
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        return proposal["value"]

    @validate("cpu_limit", "launch_timeout")
    def _check_non_negative(self, proposal: Any) -> float:
        name, value = proposal["trait"].name, proposal["value"]
        if value < 0 or (name == "launch_timeout" and value == 0):
            raise TraitError(f"invalid {name} {value!r}: must be a positive number of seconds"
                             if name == "launch_timeout" else
                             f"invalid {name} {value!r}: must be >= 0")  # fmt: skip
        return value

    @validate("pool_size", "max_templates")
    def _check_count(self, proposal: Any) -> int:
        if proposal["value"] < 0:
            raise TraitError(
                f"invalid {proposal['trait'].name} {proposal['value']!r}: must be >= 0"
            )
        return proposal["value"]

    @validate("pids_limit")
    def _check_pids(self, proposal: Any) -> int:
        value = proposal["value"]
        if value < 0 or 0 < value < 8:
            raise TraitError(f"invalid pids_limit {value!r}: 0 (none) or at least 8")
        return value

    @validate("extra_mounts")
    def _check_mounts(self, proposal: Any) -> list[str]:
        for text in proposal["value"]:
            try:
                filesystem.ExtraMount.parse(text)
            except ValueError as exc:
                raise TraitError(f"extra_mounts: {exc}") from None
        return proposal["value"]

    # -- the runtime and the kernel's private directory -------------------------------------
    @property
    def runtime_instance(self) -> SandboxRuntime:
        if self._runtime is None:
            self._runtime = create_runtime(self.runtime, parent=self, **self._runtime_options)
        return self._runtime

    @property
    def kernel_dir(self) -> Path:
        check_kernel_id(str(self.kernel_id))
        return Path(self.state_root) / str(self.kernel_id)

    def _make_kernel_dir(self) -> Path:
        """The kernel's private directory, in ``state_root``: traversable (0711) so that a
        root server's sandboxes, which set up as the sandbox uid, reach their own
        directory by its unguessable name; listable by no one else."""
        root = Path(self.state_root)
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o066:
            raise SandboxStartError(
                f"{root} must be a directory owned by uid {os.getuid()} that only its owner "
                "can list or write (mode 0711 or 0700); remove it or set "
                "SandboxProvisioner.state_root"
            )
        if st.st_mode & 0o777 != 0o711:
            root.chmod(0o711)
        kdir = self.kernel_dir
        kdir.mkdir(mode=0o711, exist_ok=True)
        kdir.chmod(0o711)
        (kdir / "ipc").mkdir(mode=0o700, exist_ok=True)
        return kdir

    @property
    def has_process(self) -> bool:
        return self._sandbox is not None and not self._exited

    # -- launch -----------------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        check_kernel_id(str(self.kernel_id))
        runtime = self.runtime_instance
        runtime.require()
        kwargs.pop("transport_encryption", None)
        extra_arguments = kwargs.pop("extra_arguments", [])
        km = self.parent
        if self._sandbox is not None:  # a restart in place: the kernel keeps its endpoint
            cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
            return await super().pre_launch(cmd=cmd, **kwargs)
        if not runtime.local:
            # The sandbox's agent picks the ports and both sides derive the key; the
            # connection file is written once launch_kernel returns them.
            km.transport = "tcp"
            cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
            return await super().pre_launch(cmd=cmd, **kwargs)
        kdir = self._make_kernel_dir()
        # ZMQ over IPC sockets in the kernel's own directory: nothing listens on the network.
        km.transport = "ipc"
        km.ip = str(kdir / "ipc" / "k")
        km.write_connection_file(jupyter_session=kwargs.get("env", {}).get("JPY_SESSION_NAME", ""))
        self.connection_info = km.get_connection_info()
        cmd = km.format_kernel_cmd(extra_arguments=extra_arguments)
        banner = banner_arguments(cmd, f"{runtime.name} (cold start)")
        history = history_arguments(cmd, self._kernel_env(kwargs.get("env", {}), cmd))
        return await super().pre_launch(cmd=cmd + banner + history, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        if self._sandbox is not None:  # kept by cleanup(restart=True)
            info = await self._restart_in_place(cmd, kwargs.get("env", {}), kwargs.get("cwd"))
            if info is not None:
                return info
        if not self.runtime_instance.local:
            return await self._launch_remote(cmd, kwargs.get("env", {}))
        try:
            return await self._launch_local(cmd, kwargs)
        except BaseException:  # whatever failed, the start leaves nothing: no sandbox, no dir
            await self._discard_failed_start()
            raise

    async def _launch_local(self, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        """A pooled start where one can serve, else from a template, else cold."""
        if self._poolable(kwargs.get("cwd")):
            try:
                return await self._launch_pooled(cmd, kwargs.get("env", {}), kwargs.get("cwd"))
            except pool.PoolFailing as exc:
                self.log.warning("%s; kernel %s starts cold", exc, self.kernel_id)
        for path in self._socket_paths():  # a previous run's sockets
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        runtime = self.runtime_instance
        restore = getattr(runtime, "restore", None) if self.snapshot_templates else None
        # Off the event loop: the plan walks the workspace (see protected._repositories),
        # and a large one would hold up every other kernel and client of the server.
        spec = await asyncio.to_thread(self._sandbox_spec, cmd, kwargs.get("env", {}),
                                       kwargs.get("cwd"), ctl=restore is not None)  # fmt: skip
        template = self._template(spec, cmd) if restore is not None else None
        how = "from a template" if template else "cold"
        self.log.info("Starting kernel %s in a %s sandbox (%s, workspace %s)", self.kernel_id,
                      runtime.name, how, self._workspace_host or "scratch")  # fmt: skip
        if restore is not None:
            self._write_ctl(spec)
        if template is not None and restore is not None:
            try:
                return await self._start_sandbox(restore(spec, template.image), restored=True)
            except Exception as exc:  # the restore failed: a cold start instead
                self.log.warning("Kernel %s: restoring gVisor template %s failed (%s); it "
                                 "starts cold, and the template is built again", self.kernel_id,
                                 template.key, str(exc).splitlines()[0] if str(exc) else
                                 type(exc).__name__)  # fmt: skip
                await self._discard_sandbox()
                templates.discard(template)
                self._template(spec, cmd)  # its build starts again, in the background
        return await self._start_sandbox(runtime.launch(spec))

    async def _start_sandbox(self, starting: Any, restored: bool = False) -> KernelConnectionInfo:
        """Await the sandbox ``starting`` (a launch or a restore) and its kernel's sockets."""
        try:
            self._sandbox = await starting
        except OSError as exc:  # a bind refused (a path swapped after the plan), a fork failed
            raise SandboxStartError(
                f"the {self.runtime_instance.name} sandbox could not be prepared: {exc}"
            ) from None
        if restored:
            (self.kernel_dir / "ipc" / "go").touch()
        self._exited = False
        await self._wait_for_sockets()
        return self.connection_info

    async def _restart_in_place(
        self, cmd: list[str], env: dict[str, str], cwd: str | None
    ) -> KernelConnectionInfo | None:
        """A new kernel in the sandbox the last one ran in (pooled or claimed). None when
        that sandbox cannot serve any more (it died): it is cleaned up, and a claimed kernel
        starts in a new Sandbox, a pooled one in a new member."""
        sandbox, remote = self._sandbox, not self.runtime_instance.local
        assert sandbox is not None
        cmd = normalized(cmd)
        kernel_cwd = "" if remote else self._workspace(cwd)[2]
        spec = self._agent_spec(cmd, self._kernel_env(env, cmd, remote=remote), kernel_cwd)
        try:
            self.log.info("Restarting kernel %s in place", self.kernel_id)
            await sandbox.restart_kernel(spec)
        except Exception as exc:
            self.log.warning("Kernel %s cannot restart in its sandbox (%s); it gets a new one",
                             self.kernel_id, exc)  # fmt: skip
            await sandbox.cleanup()
            self._sandbox = None
            if remote:
                return None
            if not self._poolable(cwd):  # its connection was the pooled sandbox's
                raise SandboxStartError(f"the sandbox of kernel {self.kernel_id} is gone and "
                                        "no pooled sandbox can replace it") from exc  # fmt: skip
            return await self._launch_pooled(cmd, env, cwd)
        self._exited = False
        return self._agent_connection()

    def _socket_paths(self) -> list[str]:
        info = self.connection_info
        ports = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
        return [f"{info['ip']}-{info[p]}" for p in ports]

    async def _wait_for_sockets(self) -> None:
        """Return once the kernel has bound all five sockets; raise if it dies or hangs."""
        assert self._sandbox is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.launch_timeout
        paths = self._socket_paths()
        delay = 0.005  # at most 10 ms late: five stat() calls a poll cost nothing beside it
        while not all(os.path.exists(p) for p in paths):
            code = await self._sandbox.poll()
            if code is not None:
                raise SandboxStartError(
                    f"the sandboxed kernel ({self.runtime_instance.name}) exited with code "
                    f"{code} while starting. Its output:\n{self._log_tail()}"
                )
            if loop.time() > deadline:
                raise SandboxStartError(
                    f"the sandboxed kernel ({self.runtime_instance.name}) did not open its "
                    f"sockets within launch_timeout={self.launch_timeout:g}s (on a slow or "
                    "busy machine, raise SandboxProvisioner.launch_timeout). "
                    f"Its output:\n{self._log_tail()}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.01)

    async def _discard_failed_start(self) -> None:
        await self._discard_sandbox()
        shutil.rmtree(self.kernel_dir, ignore_errors=True)

    async def _discard_sandbox(self) -> None:
        """End the sandbox of a start that failed; the kernel's directory stays, without
        the sockets and the restore's go-ahead."""
        if self._sandbox is not None:
            await self._sandbox.cleanup()
        self._sandbox = None
        self._exited = True
        for path in [*self._socket_paths(), str(self.kernel_dir / "ipc" / "go")]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(Exception):
            self.parent.cleanup_connection_file()

    def _log_tail(self) -> str:
        try:
            data = (self.kernel_dir / "kernel.log").read_bytes()[-_LOG_TAIL:]
        except OSError:
            return "(no output)"
        return data.decode(errors="replace").strip() or "(no output)"

    # -- lifecycle --------------------------------------------------------------------------
    async def poll(self) -> int | None:
        if self._sandbox is None:
            return 0
        return await self._sandbox.poll()

    async def wait(self) -> int | None:
        if self._sandbox is None:
            return 0
        code = await self._sandbox.wait()
        self._exited = True
        return code

    async def send_signal(self, signum: int) -> None:
        if self._sandbox is not None:
            await self._sandbox.send_signal(signum)

    async def terminate(self, restart: bool = False) -> None:
        self._stop_requested = True
        if self._sandbox is not None:
            await self._sandbox.terminate()

    async def kill(self, restart: bool = False) -> None:
        self._stop_requested = True
        if self._sandbox is not None:
            await self._sandbox.kill()

    async def shutdown_requested(self, restart: bool = False) -> None:
        # A requested stop (shutdown or restart) is no crash: cleanup will not warn. Local
        # sandboxes end the same way either way, so jupyter_client not passing ``restart``
        # on to terminate/kill (#1061) costs nothing here; cleanup receives it correctly.
        self._stop_requested = True

    async def cleanup(self, restart: bool = False) -> None:
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None and restart and sandbox.restarts_in_place:
            self._sandbox = sandbox  # launch_kernel starts the next kernel in it
            self._exited = True
            self._stop_requested = False
            return
        if sandbox is not None:
            code = await sandbox.poll()
            if code not in (None, 0) and not self._stop_requested:
                self.log.warning(
                    "Sandboxed kernel %s exited with code %s%s. Last output:\n%s",
                    self.kernel_id,
                    code,
                    " (memory limit reached)" if getattr(sandbox, "oom_killed", bool)() else "",
                    await sandbox.output_tail() or self._log_tail(),
                )
            await sandbox.cleanup()
        self._exited = True
        self._stop_requested = False
        if not restart:
            shutil.rmtree(self.kernel_dir, ignore_errors=True)

    # -- persistence, timeouts, paths -------------------------------------------------------
    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        connection = dict(info.get("connection_info") or {})
        if isinstance(connection.get("key"), bytes):  # JSON-able, for managers that persist it
            info["connection_info"] = {**connection, "key": connection["key"].decode()}
        info["sandbox_runtime"] = self.runtime_instance.name
        info["runtime_options"] = self._runtime_options
        info["sandbox"] = self._sandbox.info() if self._sandbox is not None else None
        info["state_root"] = self.state_root
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        if isinstance(self.connection_info.get("key"), str):
            self.connection_info = {
                **self.connection_info,
                "key": self.connection_info["key"].encode(),
            }
        self.runtime = provisioner_info["sandbox_runtime"]
        self.state_root = provisioner_info["state_root"]
        self._runtime_options = dict(provisioner_info.get("runtime_options") or {})
        self._runtime = None
        found = provisioner_info.get("sandbox")
        if found and found.get("pooled"):
            self._sandbox = pool.PoolMember.reattach(self.runtime_instance, found, self.log)
            self._exited = False
        elif found:
            self._sandbox = self.runtime_instance.reattach(found)
            self._exited = False

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return recommended

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self.launch_timeout)

    def resolve_path(self, path_str: str) -> str | None:
        """Resolve ``path_str`` against the workspace, never outside it."""
        if self._workspace_host is None:
            return None
        path = Path(self._workspace_host, os.path.expanduser(path_str)).resolve()
        if pyenv.is_within(str(path), self._workspace_host) and path.exists():
            return path.as_posix()
        return None
