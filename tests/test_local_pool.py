"""Local warm pools: kernels from sandboxes started before their notebook was known.

The lifecycle, isolation and notebook suites already run pooled kernels
("bubblewrap-pooled"); these tests are about the pool itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from conftest import KERNEL_AGE, async_wait_until, require_runtime

from sandbox_provisioner import pool
from sandbox_provisioner.runtimes.process import is_running, process_start_time


@pytest.fixture(autouse=True)
def _bubblewrap() -> None:
    require_runtime("bubblewrap")


@pytest.fixture(params=["bubblewrap", "gvisor"])
def pooling_runtime(request: pytest.FixtureRequest) -> str:
    require_runtime(request.param)
    return request.param


def only_pool() -> pool.LocalPool:
    (found,) = pool._POOLS.values()
    return found


async def test_two_notebooks_see_only_their_own_directory(
    pooling_runtime, start_kernel, tmp_path: Path
):
    root = tmp_path / "server-root"
    a, b = root / "alice" / "nb", root / "bob" / "nb"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "mine.txt").write_text(d.parent.name)
    (root / "secret.txt").write_text("on the stage only")
    config = {"pool_size": 2, "pool_root": str(root)}
    first = await start_kernel(pooling_runtime, cwd=a, **config)
    await async_wait_until(lambda: only_pool().ready == 2, timeout=60)
    second = await start_kernel(pooling_runtime, cwd=b, **config)
    for kernel, own, other in ((first, a, b), (second, b, a)):
        assert await kernel.value("os.getcwd()") == str(own)
        assert await kernel.value("open('mine.txt').read()") == own.parent.name
        assert not await kernel.value(f"os.path.exists({str(other)!r})")
        assert await kernel.value(f"os.listdir({str(root)!r})") == [own.parent.name]
        # The stage the pool started with is gone from the kernel's view, whichever way
        # it looks: its mount point, the agent's root, the agent's descriptors.
        stage = pool.STAGE_TARGET
        for path in (
            f"{stage}/secret.txt",
            f"{pool.STAGE_RO_TARGET}/secret.txt",
            f"{stage}/{other.parent.name}/nb/mine.txt",
            f"/proc/1/root{stage}/secret.txt",
            f"/proc/1/root/{other}/mine.txt",
        ):
            result = await kernel.run(f"open({path!r}).read()")
            assert result.error.get("ename") in ("FileNotFoundError", "PermissionError"), path
        assert not await kernel.value(f"os.path.exists({stage!r}) and os.listdir({stage!r})")
        found = await kernel.value("[f for d, _, fs in os.walk('/') if not d.startswith("
                                   "('/proc', '/sys', '/usr', '/dev')) for f in fs "
                                   "if f == 'secret.txt']")  # fmt: skip
        assert found == []
        # Its capabilities: only CAP_DAC_OVERRIDE (a root server's files), nothing to mount.
        status = await kernel.value("open('/proc/self/status').read()")
        caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
        assert int(caps["CapEff"], 16) & ~0x2 == 0 and int(caps["CapBnd"], 16) & ~0x2 == 0, caps
        assert (await kernel.run("open('written.txt', 'w').write('x')")).ok
        assert (own / "written.txt").exists()
        await _cannot_reach_the_agent(kernel)
    reply = await second.kc.kernel_info(reply=True, timeout=30)
    banner = f"Sandboxed kernel: {pooling_runtime}, pooled (warm start)"
    assert banner in reply["content"]["banner"]


#: Run in a pooled kernel: everything it can read of the sandbox's other processes (the
#: agent, the zygote), and a write through each of their descriptors it can open.
_PROBE_OTHERS = """
import os
seen = []
for pid in ("1", "2"):
    for name in ("environ", "cmdline", "mem"):
        try:
            seen.append(open(f"/proc/{pid}/{name}", "rb").read(65536))
        except OSError:
            pass
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:  # never blocking: some are pipes
        for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDONLY):
            try:
                opened = os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if flags == os.O_RDONLY:
                    seen.append(os.read(opened, 65536))
                else:
                    os.write(opened, b"WRITTEN-BY-THE-KERNEL")
            except OSError:
                pass
            finally:
                os.close(opened)
"""


async def _cannot_reach_the_agent(kernel) -> None:
    """The session that controls the agent is in nothing the kernel can read of the other
    processes, and nothing it writes through their descriptors reaches the host."""
    import base64

    member = kernel.provisioner()._sandbox
    assert (await kernel.run(_PROBE_OTHERS)).ok
    seen = await kernel.value("b''.join(seen)")
    for secret in (member.session, base64.b64encode(member.session)):
        assert secret not in seen
    assert b"WRITTEN-BY-THE-KERNEL" not in (member.slot / "agent.log").read_bytes()


async def test_one_pool_serves_every_notebook(start_kernel, tmp_path: Path):
    """What JupyterLab sets per notebook (JPY_SESSION_NAME, in the shipped allowlist) and
    a locale reach each kernel, and no other's, and do not make a pool per notebook."""
    root = tmp_path / "root"
    a, b = root / "a", root / "b"
    for d in (a, b):
        d.mkdir(parents=True)
    config = {"pool_size": 1, "pool_root": str(root),
              "env_allowlist": ["JPY_SESSION_NAME", "LC_*"]}  # fmt: skip
    first = await start_kernel("bubblewrap", cwd=a, **config,
                               env={"JPY_SESSION_NAME": "a/one.ipynb", "LC_TIME": "C"})  # fmt: skip
    member_pool = only_pool()
    assert await async_wait_until(lambda: member_pool.ready == 1, timeout=60)
    second = await start_kernel("bubblewrap", cwd=b, **config,
                                env={"JPY_SESSION_NAME": "b/two.ipynb"})  # fmt: skip
    assert list(pool._POOLS.values()) == [member_pool]
    reply = await second.kc.kernel_info(reply=True, timeout=30)
    assert "pooled (warm start)" in reply["content"]["banner"]
    assert await first.value("os.environ['JPY_SESSION_NAME']") == "a/one.ipynb"
    assert await first.value("os.environ.get('LC_TIME')") == "C"
    assert await second.value("os.environ['JPY_SESSION_NAME']") == "b/two.ipynb"
    assert await second.value("os.environ.get('LC_TIME')") is None


async def test_a_warm_kernel_was_prepared_before_its_notebook(
    pooling_runtime, start_kernel, tmp_path: Path
):
    """A member's kernel initializes at boot and becomes a notebook's when it is taken:
    that notebook's directory (as IPython recorded it too) and session name."""
    root = tmp_path / "root"
    a, b = root / "a", root / "b"
    for d in (a, b):
        d.mkdir(parents=True)
    config = {"pool_size": 1, "pool_root": str(root), "env_allowlist": ["JPY_SESSION_NAME"]}
    first = await start_kernel(pooling_runtime, cwd=a, **config,
                               env={"JPY_SESSION_NAME": "a/one.ipynb"})  # fmt: skip
    member_pool = only_pool()
    assert await async_wait_until(lambda: member_pool.ready == 1, timeout=60)
    await asyncio.sleep(3)
    second = await start_kernel(pooling_runtime, cwd=b, **config,
                                env={"JPY_SESSION_NAME": "b/two.ipynb"})  # fmt: skip
    assert await second.value(KERNEL_AGE) > 2  # it was waiting, initialized
    for kernel, own, name in ((first, a, "a/one.ipynb"), (second, b, "b/two.ipynb")):
        assert await kernel.value("os.getcwd()") == str(own)
        assert await kernel.value("[str(d) for d in _dh]") == [str(own)]
        assert await kernel.value("get_ipython().starting_dir") == str(own)
        assert await kernel.value("__session__") == name
        assert await kernel.value("open('made-here.txt', 'w').write('x')") == 1
        assert (own / "made-here.txt").read_text() == "x"


async def test_a_warm_take_refills_once_its_kernel_has_started(start_kernel, notebook_dir: Path):
    """The replacement of a member handed out boots REFILL_DELAY later, not while the
    kernel its user waits for answers its first messages; a take that finds no member
    starts one at once."""
    config = {"pool_size": 1, "pool_root": str(notebook_dir.parent.parent)}
    await start_kernel("bubblewrap", **config)
    member_pool = only_pool()
    assert await async_wait_until(lambda: member_pool.ready == 1, timeout=60)
    taken = [await member_pool.take(10)]
    try:
        assert taken[0].warm and member_pool.ready == 0 and not member_pool._starting
        taken.append(await member_pool.take(60))  # none ready, none starting: it makes one
        assert not taken[1].warm
        assert await async_wait_until(lambda: member_pool.ready == 1, timeout=60)
    finally:
        for member in taken:
            await member.cleanup()


async def test_a_member_that_died_is_replaced_not_handed_out(start_kernel, notebook_dir: Path):
    config = {"pool_size": 1, "pool_root": str(notebook_dir.parent.parent)}
    first = await start_kernel("bubblewrap", **config)
    member_pool = only_pool()
    assert await async_wait_until(lambda: member_pool.ready == 1, timeout=60)
    waiting = member_pool._ready[0]
    doomed = waiting.sandbox.host_pids()
    os.kill(doomed[0], signal.SIGKILL)  # its bwrap monitor: the whole sandbox dies
    assert await async_wait_until(lambda: waiting.sandbox.poll(), timeout=10)
    second = await start_kernel("bubblewrap", **config)
    assert second.provisioner()._sandbox is not waiting
    assert not waiting.slot.exists()  # the dead one was cleaned up
    assert (await second.run("print('alive')")).stdout.strip() == "alive"
    assert (await first.run("print('still here')")).stdout.strip() == "still here"


async def test_closing_the_pool_leaves_nothing(start_kernel, notebook_dir: Path):
    config = {"pool_size": 2, "pool_root": str(notebook_dir.parent.parent)}
    kernel = await start_kernel("bubblewrap", **config)
    member_pool = only_pool()
    assert await async_wait_until(lambda: member_pool.ready == 2, timeout=60)
    waiting = list(member_pool._ready)
    pids = {p: process_start_time(p) for m in waiting for p in m.sandbox.host_pids()}
    slots = [m.slot for m in waiting]
    assert pids and all(s.is_dir() for s in slots)
    await kernel.stop()
    await pool.close_pools()
    assert not [p for p, t in pids.items() if is_running(p, t)]
    assert not [s for s in slots if s.exists()]
    assert not list((member_pool.state_dir).glob("m-*"))


async def test_workspace_outside_the_pool_root_starts_cold(start_kernel, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kernel = await start_kernel("bubblewrap", cwd=elsewhere, pool_size=1,
                                pool_root=str(tmp_path / "root"))  # fmt: skip
    reply = await kernel.kc.kernel_info(reply=True, timeout=30)
    assert "Sandboxed kernel: bubblewrap (cold start)" in reply["content"]["banner"]
    assert await kernel.value("os.getcwd()") == str(elsewhere)


async def test_a_runtime_that_cannot_pool_ignores_pool_size(tmp_path: Path, caplog):
    """gVisor before 2024 (a stand-in runsc that only prints its version): kernels start
    cold (or from a template), with a warning, rather than failing."""
    from sandbox_provisioner import SandboxProvisioner

    fake = tmp_path / "runsc"
    fake.write_text("#!/bin/sh\necho 'runsc version 0.0~20221219.0'\n")
    fake.chmod(0o755)
    from sandbox_provisioner.launch import pooled

    pooled._NO_POOL_WARNED.discard("gvisor")  # told once per process
    provisioner = SandboxProvisioner(kernel_id="k", kernel_spec=None, runtime="gvisor",
                                     pool_size=1, runsc_path=str(fake))  # fmt: skip
    assert provisioner.runtime_instance.name == "gvisor"
    assert not provisioner._poolable(str(tmp_path))
    assert "pool_size is ignored for gvisor" in caplog.text


async def test_invalid_pool_size_is_refused():
    from traitlets import TraitError

    from sandbox_provisioner import SandboxProvisioner

    with pytest.raises(TraitError, match="invalid pool_size -1"):
        SandboxProvisioner(kernel_id="k", kernel_spec=None, pool_size=-1)
    await asyncio.sleep(0)


async def test_kernel_failing_in_a_pooled_sandbox_reports_its_output(notebook_dir: Path):
    from jupyter_client.manager import AsyncKernelManager

    from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager, spec_for_runtime
    from sandbox_provisioner.provisioner import SandboxStartError

    class Failing(RuntimeKernelSpecManager):
        def get_kernel_spec(self, kernel_name: str):
            spec = spec_for_runtime("bubblewrap", pool_size=1,
                                    pool_root=str(notebook_dir.parent))  # fmt: skip
            spec.argv = [*spec.argv, "--IPKernelApp.kernel_class=no_such_module.Kernel"]
            return spec

    km = AsyncKernelManager(kernel_name="failing", kernel_spec_manager=Failing())
    try:
        with pytest.raises(SandboxStartError, match="no_such_module") as error:
            await km.start_kernel(cwd=str(notebook_dir))
        assert "bubblewrap, pooled" in str(error.value)
        member_pool = only_pool()
        # The failed member is gone; the pool goes on with fresh ones.
        assert await async_wait_until(lambda: member_pool.ready == 1, timeout=60)
        assert len(list(member_pool.state_dir.glob("m-*"))) == 1
    finally:
        await pool.close_pools()


async def test_restart_after_the_sandbox_died_takes_a_new_member(start_kernel, notebook_dir: Path):
    kernel = await start_kernel("bubblewrap", pool_size=1,
                                pool_root=str(notebook_dir.parent.parent))  # fmt: skip
    dead = kernel.provisioner()._sandbox
    assert await async_wait_until(lambda: only_pool().ready == 1, timeout=60)
    os.kill(dead.sandbox.pid, signal.SIGKILL)  # the whole sandbox, agent included
    await kernel.km.restart_kernel(now=True)
    # A new sandbox is a new endpoint (its IPC directory): clients reconnect, as after a
    # restart with new ports.
    kernel.kc.stop_channels()
    kernel.kc = kernel.km.client()
    kernel.kc.start_channels()
    await kernel.ready()
    assert kernel.provisioner()._sandbox is not dead
    assert not dead.slot.exists()
    assert await kernel.value("os.getcwd()") == str(notebook_dir)
    assert "pooled (warm start)" in (await kernel.kc.kernel_info(reply=True))["content"]["banner"]
