"""Shared fixtures: real sandboxed ipykernels through jupyter_client.

A test that needs a runtime this machine lacks fails in CI (CI installs every
runtime); on a developer's machine it is skipped with the doctor's reason.
"""

from __future__ import annotations

import asyncio
import os
import queue
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager
from sandbox_provisioner.pool import close_pools
from sandbox_provisioner.runtimes import runtime_classes
from sandbox_provisioner.templates import forget_templates

pytest_plugins = ["cluster_fixtures", "realnode_fixtures", "hub_fixtures", "binder_fixtures"]

#: Runtimes the kernel suites run under; "-pooled" takes kernels from a local warm pool.
RUNTIMES = ["bubblewrap", "gvisor", "bubblewrap-pooled", "gvisor-pooled"]
#: Seconds a kernel's process has existed, as it sees itself (``os`` imported).
KERNEL_AGE = ("float(open('/proc/uptime').read().split()[0]) - int(open('/proc/self/stat')"
              ".read().rsplit(')', 1)[1].split()[19]) / os.sysconf('SC_CLK_TCK')")  # fmt: skip
POOLED = "-pooled"


def runtime_name(param: str) -> str:
    """The runtime of a RUNTIMES entry ("bubblewrap-pooled" -> "bubblewrap")."""
    return param.removesuffix(POOLED)


def require_runtime(name: str) -> None:
    """The runtime of ``name`` works here (and pools, for a "-pooled" entry), else the test
    fails in CI (which installs everything) or is skipped, with the reason."""
    pooled, name = name.endswith(POOLED), runtime_name(name)
    runtime = runtime_classes()[name]()
    found = runtime.availability()
    if found.available and (runtime.pooling or not pooled):
        return
    message = f"runtime {name} unavailable: {found}"
    if found.available:
        message = f"runtime {name} has no warm pools here: {found}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    require_runtime(request.param)
    return request.param


@pytest.fixture(params=[r for r in RUNTIMES if not r.endswith(POOLED)])
def cold_runtime(request: pytest.FixtureRequest) -> str:
    """Each runtime, started cold only (tests that build their own kernel managers)."""
    require_runtime(request.param)
    return request.param


@pytest.fixture
def notebook_dir(tmp_path: Path) -> Path:
    """A notebook directory inside a parent the kernel must not see."""
    nb = tmp_path / "project" / "notebooks"
    nb.mkdir(parents=True)
    (tmp_path / "project" / "outside.txt").write_text("not for the kernel")
    return nb


@dataclass
class Result:
    status: str
    stdout: str = ""
    stderr: str = ""
    error: dict[str, Any] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Kernel:
    """A started sandboxed kernel and a client, with a helper to run code."""

    def __init__(self, km: AsyncIOLoopKernelManager):
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()

    async def ready(self, timeout: float = 60) -> None:
        await self.kc.wait_for_ready(timeout=timeout)

    async def run(self, code: str, timeout: float = 60) -> Result:
        outputs: list[dict[str, Any]] = []
        reply = await self.kc.execute_interactive(
            code, timeout=timeout, output_hook=outputs.append, store_history=False
        )
        content = reply["content"]
        result = Result(content["status"])
        if content["status"] == "error":
            result.error = {k: content[k] for k in ("ename", "evalue")}
        for msg in outputs:
            kind, c = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                if c["name"] == "stdout":
                    result.stdout += c["text"]
                else:
                    result.stderr += c["text"]
            elif kind in ("execute_result", "display_data"):
                result.data.append(c["data"])
        return result

    async def value(self, expr: str) -> Any:
        """Evaluate ``expr`` in the kernel; its repr is parsed back with ast.literal_eval."""
        import ast

        result = await self.run(f"import os, socket\nprint(repr({expr}))")
        assert result.ok, result.error
        return ast.literal_eval(result.stdout.strip())

    async def reply(self, msg_id: str, timeout: float = 30) -> dict[str, Any]:
        """The shell reply to the request ``msg_id`` (sent earlier with ``kc.execute``)."""
        while True:
            msg = await self.kc._async_get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def provisioner(self) -> Any:
        return self.km.provisioner

    async def stop(self) -> None:
        self.kc.stop_channels()
        if self.km.has_kernel:
            await self.km.shutdown_kernel(now=False)


StartKernel = Callable[..., "asyncio.Future[Kernel]"]


@pytest.fixture
async def start_kernel(notebook_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await start_kernel(runtime, **provisioner_config)`` -> a ready :class:`Kernel`."""
    started: list[Kernel] = []

    async def start(runtime: str, *, cwd: Path | None = None, autorestart: bool = False,
                    app_config: Config | None = None, env: dict[str, str] | None = None,
                    **config: Any) -> Kernel:  # fmt: skip
        """``config`` goes to the kernelspec; ``app_config`` is server-wide traitlets config;
        ``env`` is added to the server's environment, as jupyter_server adds a session's."""
        if runtime.endswith(POOLED):
            runtime = runtime_name(runtime)
            config = {"pool_size": 1, "pool_root": str(notebook_dir.parent.parent), **config}
        elif runtime == "gvisor":  # truly cold unless a test asks for templates
            config = {"snapshot_templates": False, **config}
        ksm = RuntimeKernelSpecManager()
        ksm.overrides = {f"sandboxed-{runtime}": config}
        km = AsyncIOLoopKernelManager(
            kernel_name=f"sandboxed-{runtime}",
            kernel_spec_manager=ksm,
            autorestart=autorestart,
            config=app_config or Config(),
        )
        await km.start_kernel(cwd=str(cwd or notebook_dir), env={**os.environ, **(env or {})})
        kernel = Kernel(km)
        started.append(kernel)
        await kernel.ready()
        return kernel

    yield start
    for kernel in started:
        try:
            await kernel.stop()
        except Exception as exc:  # a test that already shut it down
            print(f"cleanup: {exc}")
    await close_pools()


@pytest.fixture(autouse=True)
async def _no_template_outlives_its_test() -> AsyncIterator[None]:
    """gVisor templates build in the background on the test's event loop: end them with it."""
    yield
    await forget_templates()


def wait_until(predicate: Callable[[], bool], timeout: float = 10, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


async def async_wait_until(predicate: Callable[[], Any], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        await asyncio.sleep(0.05)
    return False


__all__ = ["RUNTIMES", "Kernel", "Result", "async_wait_until", "queue", "require_runtime",
           "runtime_name"]  # fmt: skip
