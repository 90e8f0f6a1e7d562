"""The jupyter_server extension: what the provisioner cannot do for a single kernel.

* When the server stops, local warm pools and gVisor templates end with it
  (members and images removed, nothing left running).
* When the server starts, it deletes the SandboxClaims an earlier run of this
  server left behind (a crash, a kill): for every installed kernelspec on the
  kubernetes runtime, the claims labelled with this server's ``server_id``
  that no kernel of this process owns. jupyter_server's kernel manager does not
  reconnect kernels across restarts, so those claims are orphans; a kernel
  manager that does reconnect (from persisted provisioner info) must load its
  kernels before this runs, or leave this extension off.

Enable it with ``c.ServerApp.jpserver_extensions = {"sandbox_provisioner": True}``
(the example configuration does).
"""

from __future__ import annotations

import asyncio
from typing import Any

from jupyter_server.extension.application import ExtensionApp

from . import pool, templates
from .kernelspecs import PROVISIONER_NAME


class SandboxExtension(ExtensionApp):
    name = "sandbox_provisioner"
    load_other_extensions = True

    def initialize_settings(self) -> None:
        self._sweep_task: asyncio.Task[None] | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._sweep_task = loop.create_task(self.sweep_claims())
        else:
            self.serverapp.io_loop.add_callback(self._start_sweep)

    def _start_sweep(self) -> None:
        self._sweep_task = asyncio.get_running_loop().create_task(self.sweep_claims())

    def cluster_kernelspecs(self) -> dict[str, dict[str, Any]]:
        """Installed kernelspecs on the kubernetes runtime: name -> provisioner config."""
        found = {}
        for name, info in self.serverapp.kernel_spec_manager.get_all_specs().items():
            provisioner = (info["spec"].get("metadata") or {}).get("kernel_provisioner") or {}
            config = provisioner.get("config") or {}
            if provisioner.get("provisioner_name") == PROVISIONER_NAME and (
                config.get("runtime") == "kubernetes"
            ):
                found[name] = config
        return found

    async def sweep_claims(self) -> list[str]:
        """Delete what earlier runs of this server left on the cluster; the claims deleted."""
        from .runtimes.kubernetes import KubernetesRuntime, sweep_once

        deleted: list[str] = []
        done: set[tuple[str, str, str]] = set()
        for name, config in self.cluster_kernelspecs().items():
            options = {k: v for k, v in config.items()
                       if k in KubernetesRuntime.class_trait_names(config=True)}  # fmt: skip
            runtime = KubernetesRuntime(parent=self.serverapp, **options)
            where = (runtime.kubeconfig, runtime.namespace, runtime.server_id)
            if where in done or not runtime.availability().available:
                continue
            done.add(where)
            try:
                from agent_sandbox.kube import Kube

                kube = await Kube.connect(runtime.kubeconfig or None)
                try:
                    gone = await sweep_once(kube, runtime.namespace, runtime.server_id, self.log)
                    self.log.info("Claims left behind by earlier runs of server %s in %s: %d",
                                  runtime.server_id, runtime.namespace, len(gone))  # fmt: skip
                    deleted += gone
                finally:
                    await kube.close()
            except Exception as exc:  # the cluster being away must not stop the server
                self.log.warning("Could not look for claims left behind (kernelspec %s): %s",
                                 name, exc)  # fmt: skip
        return deleted

    async def stop_extension(self) -> None:
        if self._sweep_task is not None and not self._sweep_task.done():
            self._sweep_task.cancel()
        await pool.close_pools()
        await templates.forget_templates()
