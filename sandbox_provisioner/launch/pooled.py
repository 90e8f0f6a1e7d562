"""Kernels from a local warm pool (a mixin; the pool itself is :mod:`..pool`)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo

from .. import filesystem, instance, pool, pyenv
from ..agent.client import AgentError
from ..agent.kernel import BANNER_ARG
from ..runtimes.agent_driven import kernel_args
from ..spec import Mount, NetworkMode, SandboxSpec
from .plan import SandboxStartError, normalized

#: Runtimes whose kernels were told once that they do not pool.
_NO_POOL_WARNED: set[str] = set()


class PooledLaunch:
    """Mixin: take a pooled sandbox, hand its agent the kernel's plan, restart in place."""

    parent: Any
    kernel_id: Any
    log: Any
    pool_size: int
    pool_preload: list[str]
    pool_root: str
    state_root: str
    launch_timeout: float
    network: str
    runtime_instance: Any
    connection_info: Any
    _sandbox: Any
    _exited: bool
    _workspace_host: str | None

    def _pool_root(self) -> str:
        root = self.pool_root or getattr(getattr(self.parent, "parent", None), "root_dir", None)
        return os.path.realpath(root or os.getcwd())

    def _poolable(self, cwd: str | None) -> bool:
        if not self.pool_size:
            return False
        name = self.runtime_instance.name
        if not self.runtime_instance.pooling:
            if name not in _NO_POOL_WARNED:
                _NO_POOL_WARNED.add(name)
                self.log.warning("pool_size is ignored for %s sandboxes: they cannot take "
                                 "a workspace after they start", name)  # fmt: skip
            return False
        workspace = self._workspace(cwd)[0]
        return workspace is None or pyenv.is_within(workspace, self._pool_root())

    def _pool(self, cmd: list[str], env: dict[str, str]) -> pool.LocalPool:
        """This configuration's pool (members are interchangeable when all this matches)."""
        cmd = normalized(cmd)
        kernel_env = self._shared_env(env, cmd)
        root = self._pool_root()
        config = {name: getattr(self, name) for name in self.trait_names(config=True)
                  if name not in ("launch_timeout", "workspace")}  # fmt: skip
        key = json.dumps([self.runtime_instance.name, cmd[0], kernel_env, config, root],
                         sort_keys=True, default=str)  # fmt: skip

        def member_spec(
            slot: Path, controller_key: str, listen_fd: int | None
        ) -> tuple[SandboxSpec, tuple[Mount, ...]]:
            start, extra = self._own_module(cmd, kernel_env, "sandbox_provisioner.agent")
            agent_only = [filesystem.ExtraMount(root, pool.STAGE_TARGET, True),
                          filesystem.ExtraMount(root, pool.STAGE_RO_TARGET, False)]  # fmt: skip
            if listen_fd is not None:
                listen = ["--listen-fd", str(listen_fd)]
            else:
                listen = ["--listen-path", f"{pool.AGENT_DIR_TARGET}/{pool.AGENT_SOCKET}"]
                agent_only.append(filesystem.ExtraMount(
                    str(slot / pool.AGENT_DIR), pool.AGENT_DIR_TARGET, True))  # fmt: skip
            who = self._identity()
            argv = [*start, "serve", *listen,
                    "--stage", pool.STAGE_TARGET, "--stage", pool.STAGE_RO_TARGET,
                    "--confine", "--workdir", filesystem.SCRATCH_TARGET,
                    "--kernel-caps", "CAP_DAC_OVERRIDE" if who.separate else "",
                    "--preload", ",".join(self.pool_preload),
                    *self._prepare_argument(cmd, slot)]  # fmt: skip
            (slot / "scratch").mkdir(exist_ok=True)
            uid = self._inside_uid()
            inherited = self._mounts(cmd, kernel_env, None, True, slot / "scratch", slot, uid)
            return SandboxSpec(
                kernel_id=f"pool-{slot.name}",
                argv=argv,
                env={**kernel_env, pool.CONTROLLER_KEYS_ENV: controller_key},
                cwd=filesystem.SCRATCH_TARGET,
                mounts=self._mounts(
                    cmd, kernel_env, None, True, slot / "scratch", slot, uid,
                    extra=tuple(extra), agent_only=tuple(agent_only),
                ),
                network=NetworkMode(self.network),
                limits=self._limits(),
                state_dir=slot,
                log_path=slot / "agent.log",
                agent=True,
                identity=who,
                keep_fds=() if listen_fd is None else (listen_fd,),
            ), inherited

        def make() -> pool.LocalPool:
            return pool.LocalPool(
                self.runtime_instance, member_spec, size=self.pool_size,
                state_dir=instance.directory(self.state_root) / "pool", log=self.log,
            )  # fmt: skip

        self._make_kernel_dir()  # state_root exists, with the right owner and mode
        return pool.pool_for(key, make)

    @staticmethod
    def _prepare_argument(cmd: list[str], slot: Path) -> list[str]:
        """Have the member's agent prepare the first kernel (:mod:`..agent.prepared`)."""
        try:
            args = [a for a in kernel_args(cmd) if not a.startswith(BANNER_ARG)]
        except ValueError:
            return []  # not an IPython kernel: the start says why
        return ["--prepare", json.dumps({"connection": pool.kernel_endpoint(slot), "args": args})]

    async def _launch_pooled(
        self, cmd: list[str], env: dict[str, str], cwd: str | None
    ) -> KernelConnectionInfo:
        cmd = normalized(cmd)
        member_pool = self._pool(cmd, env)
        try:
            member = await member_pool.take(self.launch_timeout)
        except TimeoutError:
            raise SandboxStartError(
                f"no pooled {self.runtime_instance.name} sandbox was ready within "
                f"launch_timeout={self.launch_timeout:g}s: the pool is still starting its "
                "members or they fail (the server log says why); try again, or raise "
                "SandboxProvisioner.launch_timeout"
            ) from None
        # Ours from here: a failed start ends it (the provisioner's launch_kernel).
        self._sandbox, self._exited = member, False
        kernel_env = self._kernel_env(env, cmd)
        workspace, writable, kernel_cwd = self._workspace(cwd)
        self._workspace_host = workspace
        scratch = member.slot / "scratch" if workspace is None else None
        mounts = await asyncio.to_thread(  # off the event loop, as a cold start's plan
            self._mounts, cmd, kernel_env, workspace, writable, scratch, member.slot,
            self._inside_uid(),
        )  # fmt: skip
        plan = pool.stage_plan(list(mounts), list(member.inherited), self._pool_root(),
                               self.runtime_instance.host_inodes)  # fmt: skip
        assert plan is not None, "_poolable checked that the workspace is on the stage"
        member.plan = plan
        self.log.info("Starting kernel %s in a pooled %s sandbox (%s, workspace %s)",
                      self.kernel_id, self.runtime_instance.name,
                      "warm" if member.warm else "waited for", workspace or "scratch")  # fmt: skip
        try:
            await member.start_kernel(self._agent_spec(cmd, kernel_env, kernel_cwd))
        except AgentError as exc:
            raise SandboxStartError(
                f"the sandboxed kernel ({member.describe()}) did not start: {exc}. "
                f"Its output:\n{exc.log.strip() or '(no output)'}"
            ) from None
        return self._agent_connection()

    def _agent_spec(self, cmd: list[str], kernel_env: dict[str, str], cwd: str) -> SandboxSpec:
        return SandboxSpec(kernel_id=str(self.kernel_id), argv=cmd, env=kernel_env, cwd=cwd,
                           mounts=())  # fmt: skip

    def _agent_connection(self) -> KernelConnectionInfo:
        assert self._sandbox is not None
        info = self._sandbox.connection_info()
        assert info is not None
        self.connection_info = {**info, "kernel_name": self.parent.kernel_name}
        return self.connection_info
