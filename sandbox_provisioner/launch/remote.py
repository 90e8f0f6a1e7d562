"""Kernels in sandboxes elsewhere: a claimed Sandbox on a cluster (a mixin)."""

from __future__ import annotations

import asyncio
from typing import Any

from jupyter_client.connect import KernelConnectionInfo

from ..spec import SandboxSpec
from .plan import SandboxStartError


class RemoteLaunch:
    """Mixin: start a kernel through a remote runtime, or restart it in its sandbox."""

    kernel_id: Any
    log: Any
    launch_timeout: float
    runtime_instance: Any
    _sandbox: Any
    _exited: bool

    async def _launch_remote(self, cmd: list[str], env: dict[str, str]) -> KernelConnectionInfo:
        """A kernel in a new sandbox elsewhere (restarts in place are the provisioner's)."""
        spec = SandboxSpec(
            kernel_id=str(self.kernel_id),
            argv=cmd,
            env=self._kernel_env(env, cmd, remote=True),
            cwd="",
            mounts=(),
        )
        runtime = self.runtime_instance
        self.log.info("Starting kernel %s in a %s sandbox", self.kernel_id, runtime.name)
        try:
            self._sandbox = await asyncio.wait_for(runtime.launch(spec), self.launch_timeout)
        except TimeoutError:
            raise SandboxStartError(
                f"the {runtime.name} sandbox did not start within "
                f"launch_timeout={self.launch_timeout:g}s"
            ) from None
        self._exited = False
        return self._agent_connection()
