"""What a sandbox holds: its mounts, environment, workspace and limits (a mixin).

One place computes a kernel's filesystem, so that a cold sandbox, a pooled
sandbox's late binding and a gVisor template's layout are the same plan.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path
from typing import Any

from jupyter_core.paths import (
    jupyter_config_dir,
    jupyter_config_path,
    jupyter_data_dir,
    jupyter_path,
    jupyter_runtime_dir,
)

from .. import filesystem, identity, pyenv, templates
from ..errors import SandboxError
from ..limits import parse_size
from ..spec import Mount, NetworkMode, ResourceLimits, SandboxSpec, WorkspaceMode

#: Set by the provisioner in every sandbox, so code can tell where it runs.
RUNTIME_ENV = "JUPYTER_SANDBOX_RUNTIME"
#: The port of the Jupyter server a kernel was started by (not a secret: the sandbox cannot
#: reach it; the example notebook shows that it cannot).
SERVER_PORT_ENV = "JUPYTER_SANDBOX_SERVER_PORT"


def server_port() -> int | None:
    """The TCP port of the jupyter_server this process is, if it is one (and listens on
    TCP); never imports jupyter_server."""
    serverapp = sys.modules.get("jupyter_server.serverapp")
    if serverapp is None or not serverapp.ServerApp.initialized():
        return None
    app = serverapp.ServerApp.instance()
    return None if getattr(app, "sock", "") else int(app.port)
#: The module a gVisor template runs.
TEMPLATE_MODULE = "sandbox_provisioner.agent.template"


def jupyter_dirs() -> tuple[str, ...]:
    """Where Jupyter and IPython read configuration and data, and keep runtime files
    (server tokens): the server's, which a kernel must never write."""
    ipython = os.environ.get("IPYTHONDIR") or os.path.join(os.path.expanduser("~"), ".ipython")
    found = [jupyter_runtime_dir(), jupyter_data_dir(), jupyter_config_dir(),
             *jupyter_config_path(), *jupyter_path(), ipython]  # fmt: skip
    return tuple(dict.fromkeys(os.path.abspath(p) for p in found))


class SandboxStartError(SandboxError):
    """The sandboxed kernel did not come up; the message carries its last output."""


def normalized(cmd: list[str]) -> list[str]:
    """``cmd`` with an absolute interpreter path normalized: ".." through a directory the
    sandbox lacks cannot resolve."""
    return [os.path.normpath(cmd[0]), *cmd[1:]] if os.path.isabs(cmd[0]) else cmd


class SandboxPlan:
    """Mixin: the provisioner's traits turned into a :class:`SandboxSpec`."""

    # From SandboxProvisioner (traits) and jupyter_client's base.
    parent: Any
    kernel_id: Any
    kernel_spec: Any
    env_allowlist: list[str]
    extra_mounts: list[str]
    hidden_paths: list[str]
    workspace_readonly: list[str]
    etc_allowlist: list[str]
    memory_limit: int | str
    sandbox_user: str
    cpu_limit: float
    pids_limit: int
    network: str
    workspace: str
    kernel_dir: Path
    runtime_instance: Any
    _workspace_host: str | None
    _layout: tuple[str | None, bool, bool]

    def _sandbox_spec(
        self, cmd: list[str], env: dict[str, str], cwd: str | None, ctl: bool = False
    ) -> SandboxSpec:
        """The cold sandbox; with ``ctl`` laid out as a template's (see _mounts), to be
        booted or restored alike, its connection file in the control directory."""
        kdir = self.kernel_dir
        cmd = normalized(cmd)
        kernel_env = self._kernel_env(env, cmd)
        workspace, writable, kernel_cwd = self._workspace(cwd)
        scratch = None
        if workspace is None:
            scratch = kdir / "scratch"
            scratch.mkdir(exist_ok=True)
        self._workspace_host = workspace
        self._layout = (workspace, writable, scratch is not None)
        if ctl:
            mounts = self._mounts(cmd, kernel_env, workspace, writable, scratch, kdir,
                                  self._inside_uid(), ctl=True)
            if "-f" in cmd:
                at = cmd.index("-f") + 1
                cmd = [*cmd[:at], f"{templates.CTL_TARGET}/kernel.json", *cmd[at + 1 :]]
        else:
            mounts = self._mounts(cmd, kernel_env, workspace, writable, scratch, kdir,
                                  self._inside_uid(),
                                  connection_file=self.parent.connection_file)  # fmt: skip
        return SandboxSpec(
            kernel_id=str(self.kernel_id),
            argv=cmd,
            env=kernel_env,
            cwd=kernel_cwd,
            mounts=mounts,
            network=NetworkMode(self.network),
            limits=self._limits(),
            state_dir=kdir,
            log_path=kdir / "kernel.log",
            identity=self._identity(),
        )

    def _identity(self) -> identity.SandboxIdentity:
        try:
            return identity.resolve(self.sandbox_user)
        except ValueError as exc:
            raise SandboxStartError(str(exc)) from None

    def _inside_uid(self) -> int:
        """The kernel's uid inside its sandbox: 65534 under bubblewrap (its own user
        namespace); under gVisor the host uid itself (the sandbox uid when root)."""
        if self.runtime_instance.name == "bubblewrap":
            return identity.INSIDE_UID
        return self._identity().uid

    def _mounts(
        self,
        cmd: list[str],
        kernel_env: dict[str, str],
        workspace: str | None,
        writable: bool,
        scratch: Path | None,
        state_dir: Path,
        uid: int,
        connection_file: str | None = None,
        extra: tuple[filesystem.ExtraMount, ...] = (),
        ctl: bool = False,
        agent_only: tuple[filesystem.ExtraMount, ...] = (),
    ) -> tuple[Mount, ...]:
        """The sandbox's filesystem; ``state_dir`` holds its ipc/ and etc/ directories.

        With ``ctl``, laid out as a gVisor template's: nothing at a per-kernel destination
        (the ipc directory at CTL_TARGET, no connection file) and the template runner."""
        ipc = not ctl
        if ctl:
            _, runner_mounts = self._own_module(cmd, kernel_env, TEMPLATE_MODULE)
            ctl_dir = filesystem.ExtraMount(str(state_dir / "ipc"), templates.CTL_TARGET, True)
            extra, connection_file = (*extra, *runner_mounts, ctl_dir), None
        return filesystem.build_mounts(
            python_paths=list(pyenv.python_dirs(cmd[0], kernel_env.get("PYTHONPATH", ""))),
            workspace=workspace,
            workspace_writable=writable,
            scratch_dir=str(scratch) if scratch else None,
            ipc_dir=str(state_dir / "ipc") if ipc else None,
            connection_file=connection_file,
            etc_mounts=filesystem.synthetic_etc(state_dir / "etc", "sandbox", uid, uid),
            extra=[*(filesystem.ExtraMount.parse(m) for m in self.extra_mounts), *extra],
            agent_only=list(agent_only),
            etc_allowlist=tuple(self.etc_allowlist),
            hidden_paths=tuple(self.hidden_paths),
            workspace_readonly=tuple(self.workspace_readonly),
            jupyter_dirs=jupyter_dirs(),
            log=getattr(self, "log", None),
        )

    def _limits(self) -> ResourceLimits:
        return ResourceLimits(
            memory_bytes=parse_size(self.memory_limit, "memory_limit"),
            cpus=self.cpu_limit or None,
            pids=self.pids_limit or None,
        )

    def _kernel_env(
        self, env: dict[str, str], cmd: list[str], remote: bool = False
    ) -> dict[str, str]:
        """The allowlisted part of ``env`` plus the kernelspec's own env; nothing else.

        A remote sandbox keeps its image's PATH and HOME; it only gets the rest."""
        allowed = {
            k: v
            for k, v in env.items()
            if any(fnmatch.fnmatchcase(k, p) for p in self.env_allowlist)
        }
        spec_env = self.kernel_spec.env if self.kernel_spec else {}
        allowed.update({k: env[k] for k in spec_env if k in env})
        port = server_port()
        if port:
            allowed[SERVER_PORT_ENV] = str(port)
        if remote:
            return {**allowed, RUNTIME_ENV: self.runtime_instance.name}
        bindir = os.path.dirname(cmd[0]) if os.path.isabs(cmd[0]) else ""
        path = ":".join(p for p in (bindir, "/usr/local/bin", "/usr/bin", "/bin") if p)
        return {
            "PATH": path,
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            **allowed,
            RUNTIME_ENV: self.runtime_instance.name,
        }

    def _shared_env(self, env: dict[str, str], cmd: list[str]) -> dict[str, str]:
        """The part of the kernel's environment every kernel of this configuration shares:
        without the host variables the allowlist lets through, which vary by notebook
        (JupyterLab's JPY_SESSION_NAME, a locale). A pooled sandbox boots with this alone
        and gets the rest with its kernel, so one pool serves every notebook."""
        spec_env = self.kernel_spec.env if self.kernel_spec else {}
        per_kernel = {k for k in env if k not in spec_env
                      and any(fnmatch.fnmatchcase(k, p) for p in self.env_allowlist)}  # fmt: skip
        return {k: v for k, v in self._kernel_env(env, cmd).items() if k not in per_kernel}

    def _workspace(self, cwd: str | None) -> tuple[str | None, bool, str]:
        """(host directory to bind or None for scratch, writable, the kernel's cwd)."""
        mode = WorkspaceMode(self.workspace)
        if mode is WorkspaceMode.SCRATCH:
            return None, True, filesystem.SCRATCH_TARGET
        notebook_dir = os.path.realpath(cwd or os.getcwd())
        if not os.path.isdir(notebook_dir):
            raise SandboxStartError(f"the kernel's directory {notebook_dir} does not exist")
        directory = notebook_dir
        if mode is WorkspaceMode.ROOT:
            root_dir = getattr(getattr(self.parent, "parent", None), "root_dir", None)
            directory = os.path.realpath(root_dir or notebook_dir)
            if not pyenv.is_within(notebook_dir, directory):
                notebook_dir = directory
        if directory == "/":
            raise SandboxStartError(
                "refusing to give a sandboxed kernel the whole filesystem as its workspace; "
                "start the server in a project directory or use workspace='scratch'"
            )
        return directory, mode is not WorkspaceMode.NOTEBOOK_READONLY, notebook_dir

    def _own_module(
        self, cmd: list[str], kernel_env: dict[str, str], module: str
    ) -> tuple[list[str], list[filesystem.ExtraMount]]:
        """The command that runs ``module`` of this package with the kernel's Python in a
        sandbox, and the mounts it needs (a development checkout outside that Python)."""
        return own_module(cmd[0], module, kernel_env.get("PYTHONPATH", ""))


def own_module(
    python: str, module: str, pythonpath: str = ""
) -> tuple[list[str], list[filesystem.ExtraMount]]:
    """The command that runs ``module`` (of this project: ``sandbox_provisioner`` or
    ``sandbox_spawner``) with ``python`` in a sandbox, and the mounts it needs: the
    project's packages it uses, read-only, when they are a development checkout that
    Python does not cover."""
    package_root = pyenv.own_package_root(pyenv.python_dirs(python, pythonpath))
    if not package_root:
        return [python, "-m", module], []
    # A module of the spawner imports the provisioner's parts too (never the reverse).
    packages = dict.fromkeys([module.split(".")[0], "sandbox_provisioner"])
    mounts = [filesystem.ExtraMount(path, path, False)
              for path in (os.path.join(package_root, p) for p in packages)]  # fmt: skip
    code = (f"import sys, runpy; sys.path.insert(0, {package_root!r}); "
            f"runpy.run_module({module!r}, run_name='__main__')")  # fmt: skip
    return [python, "-c", code], mounts
