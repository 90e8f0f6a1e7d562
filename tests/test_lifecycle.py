"""Kernel lifecycle through jupyter_client.KernelManager, for every runtime."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import POOLED, async_wait_until, runtime_name

from sandbox_provisioner.limits import CGROUP_PARENT, CGROUP_ROOT
from sandbox_provisioner.runtimes.process import is_running, process_start_time


def _alive(pids: dict[int, int | None]) -> list[int]:
    """Those of ``pids`` (pid -> start time) still running: same process, not a zombie."""
    return [pid for pid, start in pids.items() if is_running(pid, start)]


async def test_execute_in_notebook_dir(runtime, start_kernel, notebook_dir: Path):
    kernel = await start_kernel(runtime)
    result = await kernel.run("import os; print(os.getcwd(), 6 * 7)")
    assert result.ok, result
    assert result.stdout.split() == [str(notebook_dir), "42"]
    assert await kernel.value("os.environ['JUPYTER_SANDBOX_RUNTIME']") == runtime_name(runtime)


async def test_banner_names_the_sandbox(runtime, start_kernel):
    kernel = await start_kernel(runtime)
    reply = await kernel.kc.kernel_info(reply=True, timeout=30)
    if runtime.endswith(POOLED):  # the pool was just made: the first kernel waited for it
        expected = f"Sandboxed kernel: {runtime_name(runtime)}, pooled ("
    else:
        expected = f"Sandboxed kernel: {runtime} (cold start)"
    assert expected in reply["content"]["banner"]


async def test_history_is_kept_for_the_session_in_memory(runtime, start_kernel):
    """The kernel's IPython directory is the sandbox's private /tmp, thrown away with it:
    the history is the session's as always, and no database is written to be discarded."""
    kernel = await start_kernel(runtime)
    for code in ("a = 6", "b = a * 7"):  # as a notebook's cells run: into the history
        reply = await kernel.kc.execute_interactive(code, timeout=30, store_history=True)
        assert reply["content"]["status"] == "ok"
    assert await kernel.value("get_ipython().history_manager.hist_file") == ":memory:"
    inputs = await kernel.value("[line for _, _, line in get_ipython().history_manager"
                                ".get_range(output=False)]")  # fmt: skip
    assert inputs[:2] == ["a = 6", "b = a * 7"], inputs
    assert await kernel.value("os.path.exists(os.path.expanduser('~/.ipython/profile_default"
                              "/history.sqlite'))") is False  # fmt: skip


async def test_an_ipython_directory_of_the_kernels_own_keeps_its_history_file(start_kernel):
    """One the kernel is given (IPYTHONDIR, allowed through) may be meant to last: its
    history database is written as IPython would."""
    from sandbox_provisioner.provisioner import DEFAULT_ENV_ALLOWLIST

    kernel = await start_kernel("bubblewrap", env={"IPYTHONDIR": "/tmp/own-ipython"},
                                env_allowlist=[*DEFAULT_ENV_ALLOWLIST, "IPYTHONDIR"])  # fmt: skip
    hist = "/tmp/own-ipython/profile_default/history.sqlite"
    assert await kernel.value("str(get_ipython().history_manager.hist_file)") == hist
    assert await kernel.value(f"os.path.exists({hist!r})") is True


async def test_the_workspace_is_walked_off_the_event_loop(
    runtime, start_kernel, notebook_dir: Path, monkeypatch
):
    """A kernel's start walks its workspace for repositories to protect, which takes as
    long as the workspace is large: not on the server's event loop, which every other
    kernel and client of the server shares."""
    import threading

    from sandbox_provisioner import protected

    walked_in: list[threading.Thread] = []
    walk = protected._repositories

    def recording(writable, *args):
        if any(b.source == str(notebook_dir) for b in writable):
            walked_in.append(threading.current_thread())
        return walk(writable, *args)

    monkeypatch.setattr(protected, "_repositories", recording)
    kernel = await start_kernel(runtime)
    assert (await kernel.run("1")).ok
    assert walked_in and threading.main_thread() not in walked_in, walked_in


async def test_interrupt_reaches_kernel(runtime, start_kernel):
    kernel = await start_kernel(runtime)
    msg_id = kernel.kc.execute("import time\nprint('looping', flush=True)\n"
                               "while True:\n    time.sleep(0.01)")
    # Interrupted once the loop runs: a fixed wait let a loaded machine's kernel take the
    # interrupt while still idle (CI saw it), and the loop then ran on.
    while True:
        msg = await kernel.kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    await kernel.km.interrupt_kernel()
    reply = await kernel.reply(msg_id)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    after = await kernel.run("print('still alive')")
    assert after.ok, after.error  # not interrupted again
    assert after.stdout.strip() == "still alive"


#: The commands of the processes the kernel sees in its sandbox.
_COMMANDS = ("[open(f'/proc/{p}/cmdline').read().split(chr(0))[0].rsplit('/', 1)[-1] "
             "for p in os.listdir('/proc') if p.isdigit()]")  # fmt: skip


async def test_restart_gives_fresh_kernel(runtime, start_kernel, notebook_dir: Path):
    kernel = await start_kernel(runtime)
    assert (await kernel.run("x = 41")).ok
    assert (await kernel.run("import subprocess; p = subprocess.Popen(['sleep', '600'])")).ok
    old_pids = {p: process_start_time(p) for p in kernel.provisioner()._sandbox.host_pids()}
    in_sentry = runtime == "gvisor" + POOLED  # its kernels are no host processes: look inside
    if in_sentry:
        assert "sleep" in await kernel.value(_COMMANDS)
    await kernel.km.restart_kernel()
    await kernel.ready()
    result = await kernel.run("print(x)")
    assert result.error.get("ename") == "NameError"
    assert (await kernel.run("x = 1; print(x + 1)")).stdout.strip() == "2"
    # Restart keeps the kernel's directory and connection file, not the old kernel.
    assert kernel.provisioner().kernel_dir.is_dir()
    if in_sentry:  # in place: the sandbox stays, the old kernel's child does not
        assert "sleep" not in await kernel.value(_COMMANDS)
    elif runtime.endswith(POOLED):
        # In place: the sandbox (bwrap, its init, the agent) stays; the old kernel and its
        # child do not.
        sandbox = set(kernel.provisioner()._sandbox.host_pids())
        old_kernel = {p: t for p, t in old_pids.items() if p not in sandbox}
        assert len(old_kernel) >= 2, (old_pids, sandbox)
        assert await async_wait_until(lambda: not _alive(old_kernel), timeout=10)
    else:
        assert await async_wait_until(lambda: not _alive(old_pids), timeout=10)


async def test_shutdown_leaves_nothing(runtime, start_kernel):
    kernel = await start_kernel(runtime, memory_limit="1G", pids_limit=256)
    assert (await kernel.run("import subprocess; p = subprocess.Popen(['sleep', '600'])")).ok
    provisioner = kernel.provisioner()
    pids = {p: process_start_time(p) for p in provisioner._sandbox.host_pids()}
    assert len(pids) >= 2, pids
    kernel_dir = provisioner.kernel_dir
    connection_file = Path(kernel.km.connection_file)
    assert kernel_dir.is_dir() and connection_file.exists()
    await kernel.stop()
    assert not kernel.km.has_kernel
    assert _alive(pids) == []
    assert not kernel_dir.exists()
    assert not connection_file.exists()
    groups = list(CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}/*{kernel.km.kernel_id}*"))
    assert groups == []


async def test_crash_is_detected_and_kernel_restarts(runtime, start_kernel):
    kernel = await start_kernel(runtime, autorestart=True)
    restarted = asyncio.Event()
    kernel.km.add_restart_callback(restarted.set, "restart")
    kernel.kc.execute("import os; os._exit(3)")
    await asyncio.wait_for(restarted.wait(), timeout=30)
    await kernel.ready()
    assert (await kernel.run("print('back')")).stdout.strip() == "back"


async def test_reconnect_from_provisioner_info(runtime, start_kernel):
    """Another process rebuilds the provisioner from its persisted info and controls the kernel."""
    import json
    import signal

    from sandbox_provisioner import SandboxProvisioner

    kernel = await start_kernel(runtime)
    info = await kernel.provisioner().get_provisioner_info()
    # What this provisioner adds is JSON (jupyter_client's connection_info holds a bytes key).
    info = {**info, "sandbox": json.loads(json.dumps(info["sandbox"]))}
    assert info["sandbox_runtime"] == runtime_name(runtime)
    assert (info["sandbox"].get("sandbox") or info["sandbox"])["pid"]

    other = SandboxProvisioner(kernel_id=info["kernel_id"], kernel_spec=kernel.km.kernel_spec)
    await other.load_provisioner_info(info)
    assert other.connection_info == kernel.provisioner().connection_info
    assert other.has_process and await other.poll() is None

    msg_id = kernel.kc.execute("import time\nwhile True:\n    time.sleep(0.01)")
    await asyncio.sleep(1.0)
    await other.send_signal(signal.SIGINT)
    reply = await kernel.reply(msg_id)
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    kernel_dir = other.kernel_dir
    await other.kill()
    await asyncio.wait_for(other.wait(), timeout=15)
    assert await async_wait_until(lambda: kernel.provisioner().poll(), timeout=15)
    await other.cleanup()
    assert not kernel_dir.exists()
