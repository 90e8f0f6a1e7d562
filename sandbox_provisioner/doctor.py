"""``jupyter sandbox doctor``: which runtimes work on this machine, and why not.

The brief check asks each runtime whether its parts are here. The full check
then starts a real sandboxed kernel with each available runtime, runs code in
it and shuts it down: the only proof that a runtime works.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from . import identity
from .kernelspecs import RuntimeKernelSpecManager
from .limits import cgroups_available
from .pool import close_pools
from .runtimes import runtime_classes


@dataclass
class RuntimeReport:
    name: str
    available: bool
    detail: str
    started: bool | None = None
    seconds: float | None = None
    error: str = ""
    #: False for a runtime of clusters (kubernetes): not having it here is no fault.
    local: bool = True

    def line(self) -> str:
        mark = "ok " if self.available and self.started is not False else "NO "
        if not self.local and not self.available:
            where = "for kernels on a Kubernetes cluster, not used here"
            return f"--  {self.name:<11} {where} ({self.detail})"
        text = f"{mark} {self.name:<11} {self.detail}"
        if self.started:
            text += f"; kernel ran code (ready in {self.seconds:.2f}s)"
        elif self.started is False:
            text += f"; kernel failed: {self.error}"
        return text


async def start_kernel_once(runtime: str, timeout: float = 60, config: Any = None) -> float:
    """Start a sandboxed kernel, execute code, shut it down; seconds to the first reply."""
    km = AsyncKernelManager(
        kernel_name=f"sandboxed-{runtime}",
        kernel_spec_manager=RuntimeKernelSpecManager(),
        **({"config": config} if config is not None else {}),
    )
    with tempfile.TemporaryDirectory(prefix="sandbox-doctor-") as workdir:
        try:
            return await _run_once(km, workdir, timeout)
        finally:
            await close_pools()  # the pools its start made, and their cgroups


async def _run_once(km: AsyncKernelManager, workdir: str, timeout: float) -> float:
    started = time.perf_counter()
    await km.start_kernel(cwd=workdir)
    try:
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=timeout)
            reply = await kc.execute_interactive(
                "1 + 1", timeout=timeout, store_history=False, output_hook=lambda msg: None
            )
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"execute failed: {reply['content']}")
            return time.perf_counter() - started
        finally:
            kc.stop_channels()
    finally:
        await km.shutdown_kernel(now=True)


async def diagnose(full: bool = True, parent: Any = None) -> list[RuntimeReport]:
    """Check every installed runtime (``parent`` carries runtime config, e.g. binary paths)."""
    reports = []
    for name, cls in runtime_classes().items():
        found = cls(parent=parent).availability()
        report = RuntimeReport(name, found.available, str(found), local=cls.local)
        if full and found.available:
            try:
                report.seconds = await start_kernel_once(
                    name, config=getattr(parent, "config", None)
                )
                report.started = True
            except Exception as exc:
                report.started = False
                report.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reports.append(report)
    return reports


def host_facts() -> list[str]:
    root = os.geteuid() == 0
    who = identity.resolve()
    kernels = (
        f"kernels run as uid {who.uid} (never root; files they create are that uid's)"
        if who.separate
        else "kernels run as this user, in user namespaces of their own"
    )
    return [
        f"running as {'root' if root else f'uid {os.geteuid()}'}; {kernels}",
        "limits: cgroup v1 (memory, cpu, pids)"
        if cgroups_available()
        else "limits: rlimits only (address space, processes); no CPU limit without root",
    ]


def run(full: bool = True, parent: Any = None) -> int:
    reports = asyncio.run(diagnose(full, parent))
    for report in reports:
        print(report.line())
    for fact in host_facts():
        print(f"    {fact}")
    local = {name for name, cls in runtime_classes().items() if cls.local}
    usable = [r for r in reports if r.available and r.started is not False and r.name in local]
    if usable:
        print(f"'auto' uses: {usable[0].name}")
        return 0
    print("no sandbox runtime works here: sandboxed kernels will not start")
    return 1
