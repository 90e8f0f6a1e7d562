"""gVisor kernels grow their heap in large steps (GVisorRuntime.malloc_top_pad).

Each growth of a glibc heap is a ``brk`` system call, and system calls are what
gVisor makes costly; the runtime has glibc add a pad to each growth. What is
observed here is the heap itself: how far its end moves when it has to grow.
"""

from __future__ import annotations

import pytest
from conftest import require_runtime
from traitlets.config import Config

#: Grow the heap (allocations under the mmap threshold, kept alive) until its end moves;
#: how far it moved.
HEAP_STEP = """
import ctypes
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
start, kept = libc.sbrk(0), []
while libc.sbrk(0) == start and len(kept) < 100000:
    kept.append(libc.malloc(64 << 10))
step = libc.sbrk(0) - start
"""


@pytest.fixture(autouse=True)
def _gvisor() -> None:
    require_runtime("gvisor")


async def heap_step(kernel) -> int:
    result = await kernel.run(HEAP_STEP)
    assert result.ok, result
    return await kernel.value("step")


@pytest.mark.parametrize("path", ["gvisor", "gvisor-pooled"])
async def test_a_gvisor_kernels_heap_grows_by_the_pad(start_kernel, path):
    """Cold, and forked in a pool's member (whose process had the pad from its start)."""
    kernel = await start_kernel(path)
    assert await heap_step(kernel) >= 16 << 20


async def test_without_the_pad_the_heap_grows_in_small_steps(start_kernel):
    no_pad = Config({"GVisorRuntime": {"malloc_top_pad": 0}})
    kernel = await start_kernel("gvisor", app_config=no_pad)
    assert 0 < await heap_step(kernel) < 1 << 20


async def test_the_kernels_own_glibc_tunables_are_kept(start_kernel):
    from sandbox_provisioner.provisioner import DEFAULT_ENV_ALLOWLIST

    kernel = await start_kernel("gvisor", env={"GLIBC_TUNABLES": "glibc.malloc.top_pad=2097152"},
                                env_allowlist=[*DEFAULT_ENV_ALLOWLIST, "GLIBC_TUNABLES"])
    assert 2 << 20 <= await heap_step(kernel) < 16 << 20
    assert await kernel.value("__import__('os').environ['GLIBC_TUNABLES']") == (
        "glibc.malloc.top_pad=2097152"
    )
