"""Kernel start-up: launch to first execute_reply, sandboxed runtimes against local-provisioner.

One run measures every mode, round-robin (so machine noise hits all alike), after
one warm-up each, and prints each mode's median and its ratio to jupyter_client's
own local-provisioner (a plain, unsandboxed ipykernel):

    .venv/bin/python benchmarks/kernel_startup.py [--runs 7] [--modes local,bubblewrap,...]

Modes: ``local``; each local runtime started cold (``bubblewrap``, ``gvisor``);
``<runtime>-pooled`` for runtimes with a local warm pool here (``bubblewrap-pooled``;
``gvisor-pooled`` with runsc 2024 or later; one member, refilled between runs: the
steady state of a pool sized for its load); ``gvisor-template``,
restored from a template (built after the warm-up run, as after a first cold
start). The clock starts just before ``start_kernel`` and stops at the first
execute_reply, as a notebook user waits: start, connect, kernel_info until
ready, execute. Also printed: the
memory an idle pooled sandbox holds (PSS and RSS summed over its processes). The same
through a real jupyter_server with the shipped configuration, as JupyterLab
starts a kernel: ``benchmarks/server_kernel_startup.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from memory import memory_bytes

from sandbox_provisioner import pool, templates
from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager
from sandbox_provisioner.runtimes import runtime_classes

LOCAL = "local"


class _LocalSpecs(KernelSpecManager):
    """The plain ipykernel spec, started by jupyter_client's local-provisioner."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python (local-provisioner)",
            language="python",
        )


def kernel_manager(mode: str, specs: KernelSpecManager | None = None) -> AsyncKernelManager:
    """A kernel manager for ``mode``: ``local`` (local-provisioner) or a runtime's name."""
    if mode == LOCAL:
        return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_LocalSpecs())
    return AsyncKernelManager(
        kernel_name=f"sandboxed-{mode}", kernel_spec_manager=specs or RuntimeKernelSpecManager()
    )


async def time_to_first_reply(km: AsyncKernelManager, cwd: str | None = None) -> float:
    """Seconds from ``start_kernel`` to the first execute_reply; the kernel is shut down."""
    started = time.perf_counter()
    await km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        reply = await kc.execute_interactive("1", timeout=120, output_hook=lambda m: None)
        elapsed = time.perf_counter() - started
        assert reply["content"]["status"] == "ok"
        return elapsed
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


POOLED = "-pooled"


TEMPLATE = "-template"


async def launch_to_first_reply(mode: str, cwd: str) -> float:
    if mode.endswith(TEMPLATE):
        runtime = mode.removesuffix(TEMPLATE)
        specs = RuntimeKernelSpecManager()
        specs.overrides = {f"sandboxed-{runtime}": {"snapshot_templates": True}}
        for template in list(templates._TEMPLATES.values()):  # built after the warm-up
            while not (template.ready or template.failed):
                await asyncio.sleep(0.05)
        return await time_to_first_reply(kernel_manager(runtime, specs), cwd)
    if not mode.endswith(POOLED):
        specs = RuntimeKernelSpecManager()  # cold means cold: no gVisor template
        specs.overrides = {f"sandboxed-{mode}": {"snapshot_templates": False}}
        return await time_to_first_reply(kernel_manager(mode, specs), cwd)
    runtime = mode.removesuffix(POOLED)
    specs = RuntimeKernelSpecManager()
    specs.overrides = {f"sandboxed-{runtime}": {"pool_size": 1, "pool_root": cwd}}
    for member_pool in pool._POOLS.values():  # a warm member, as a pool at rest has one
        while member_pool.ready < member_pool.size:
            await asyncio.sleep(0.05)
    return await time_to_first_reply(kernel_manager(runtime, specs), cwd)


def default_modes() -> list[str]:
    local = [cls for cls in reversed(runtime_classes().values()) if cls.local]
    # An instance says whether it pools here (gVisor: with the runsc found).
    return [LOCAL, *(c.name for c in local), *(c.name + POOLED for c in local if c().pooling),
            *(c.name + TEMPLATE for c in local if hasattr(c, "restore"))]  # fmt: skip


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per mode (>= 5)")
    parser.add_argument("--modes", default=",".join(default_modes()))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    modes = []
    for mode in args.modes.split(","):
        runtime = mode.removesuffix(POOLED).removesuffix(TEMPLATE)
        if mode != LOCAL and not runtime_classes()[runtime]().availability().available:
            print(f"{mode}: unavailable here, left out")
        else:
            modes.append(mode)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as cwd:
        for mode in modes:  # warm-up: caches, first imports
            await launch_to_first_reply(mode, cwd)
        for _ in range(args.runs):
            for mode in modes:
                samples[mode].append(await launch_to_first_reply(mode, cwd))
        for member_pool in pool._POOLS.values():  # refilled, and settled
            while member_pool.ready < member_pool.size:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2)
        idle = {p.runtime.name: memory_bytes(p._ready[0].host_pids())
                for p in pool._POOLS.values() if p.ready}  # fmt: skip
        await pool.close_pools()
        await templates.forget_templates()
    base = statistics.median(samples[LOCAL]) if LOCAL in samples else None
    print(f"launch -> first execute_reply, {args.runs} runs per mode after 1 warm-up (seconds)")
    print(f"{'mode':<20}{'median':>9}{'min':>9}{'max':>9}{'ratio':>9}")
    results = {}
    for mode, values in samples.items():
        median = statistics.median(values)
        ratio = median / base if base else float("nan")
        results[mode] = {"median": median, "min": min(values), "max": max(values), "ratio": ratio}
        print(f"{mode:<20}{median:9.3f}{min(values):9.3f}{max(values):9.3f}{ratio:8.2f}x")
    for runtime, (rss, pss) in idle.items():
        print(f"an idle pooled {runtime} sandbox holds {pss / 2**20:.0f} MiB (PSS, all its "
              f"processes; RSS summed over them {rss / 2**20:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
