"""What a sandboxed kernel cannot reach, each asserted from inside the kernel."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from conftest import runtime_name
from traitlets.config import Config


@pytest.fixture
def home_secret():
    """A secret file in the server user's real home directory."""
    path = Path.home() / f"sandbox-test-secret-{uuid.uuid4().hex}.txt"
    path.write_text("top secret")
    yield path
    path.unlink()


async def test_home_secret_is_invisible(runtime, start_kernel, home_secret: Path):
    kernel = await start_kernel(runtime)
    result = await kernel.run(f"open({str(home_secret)!r}).read()")
    assert result.error.get("ename") == "FileNotFoundError", result
    assert await kernel.value(f"os.path.exists({str(Path.home())!r} + '/.ssh')") is False


async def test_files_outside_the_notebook_dir_are_invisible(runtime, start_kernel, notebook_dir):
    kernel = await start_kernel(runtime)
    assert await kernel.value("__import__('os').listdir('..')") == [notebook_dir.name]
    result = await kernel.run("open('../outside.txt').read()")
    assert result.error.get("ename") == "FileNotFoundError"
    assert set(await kernel.value("os.listdir('/')")) <= {
        "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sys", "tmp",
        "usr", Path(notebook_dir).parts[1], Path(os.sys.prefix).parts[1],
        "run",  # a pooled gVisor sandbox's mount points, empty: see below
    }  # fmt: skip
    # Whatever a pooled sandbox's agent had there (the stage, its socket) is gone: no file.
    assert await kernel.value("[f for _, _, fs in os.walk('/run') for f in fs]") == []


async def test_writes_outside_allowed_dirs_fail(runtime, start_kernel, notebook_dir: Path):
    kernel = await start_kernel(runtime)
    targets = ["/usr/sandbox-evil", "/etc/sandbox-evil", "/sandbox-evil",
               os.sys.prefix + "/evil.txt", os.sys.prefix + "/bin/evil"]  # fmt: skip
    for target in targets:
        result = await kernel.run(f"open({target!r}, 'w').write('x')")
        assert result.error.get("ename") in ("OSError", "FileNotFoundError", "PermissionError"), (
            target,
            result,
        )
        assert not os.path.exists(target)
    # The notebook's parent lies in the sandbox's private /tmp here: a write lands there.
    beside = str(notebook_dir.parent / "evil.txt")
    await kernel.run(f"open({beside!r}, 'w').write('x')")
    assert not os.path.exists(beside)
    # The notebook directory is writable and /tmp is private to the sandbox.
    assert (await kernel.run("open('result.txt', 'w').write('ok')")).ok
    assert (notebook_dir / "result.txt").read_text() == "ok"
    marker = f"/tmp/sandbox-private-{uuid.uuid4().hex}"
    assert (await kernel.run(f"open({marker!r}, 'w').write('x')")).ok
    assert not os.path.exists(marker)


async def test_readonly_workspace(runtime, start_kernel, notebook_dir: Path):
    (notebook_dir / "data.csv").write_text("a,b\n")
    kernel = await start_kernel(runtime, workspace="notebook-readonly")
    assert await kernel.value("open('data.csv').read()") == "a,b\n"
    result = await kernel.run("open('new.txt', 'w')")
    assert result.error.get("ename") == "OSError" and "Read-only" in result.error["evalue"]


async def test_scratch_workspace_sees_no_host_dir(runtime, start_kernel, notebook_dir: Path):
    (notebook_dir / "data.csv").write_text("a,b\n")
    kernel = await start_kernel(runtime, workspace="scratch")
    assert await kernel.value("(os.getcwd(), os.listdir('.'))") == ("/workspace", [])
    assert await kernel.value(f"os.path.exists({str(notebook_dir)!r})") is False


async def test_home_dotfiles_hidden_and_git_readonly(runtime, start_kernel, tmp_path: Path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (home / ".bashrc").write_text("echo hi")
    (home / ".git" / "hooks").mkdir(parents=True)
    (home / "analysis.ipynb").write_text("{}")
    kernel = await start_kernel(runtime, cwd=home, hidden_paths=[str(home / ".*")])
    assert await kernel.value("os.listdir('.ssh')") == []
    assert await kernel.value("open('.bashrc').read()") == ""
    assert (await kernel.run("open('.bashrc', 'w').write('evil')")).error
    assert (await kernel.run("open('.git/hooks/post-checkout', 'w').write('evil')")).error
    assert (await kernel.run("open('notes.txt', 'w').write('fine')")).ok
    assert (home / ".bashrc").read_text() == "echo hi"
    assert not (home / ".git" / "hooks" / "post-checkout").exists()
    assert (home / "notes.txt").read_text() == "fine"


class _Listener:
    """A TCP server on the host's loopback that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.sendall(b"host")
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def host_listener():
    listener = _Listener()
    yield listener
    listener.close()


CONNECT = (
    "import socket\n"
    "try:\n"
    "    s = socket.create_connection(('127.0.0.1', {port}), timeout=3); print(s.recv(4))\n"
    "except OSError as e:\n"
    "    print('refused', type(e).__name__)\n"
)


async def test_host_loopback_unreachable(runtime, start_kernel, host_listener):
    with socket.create_connection(("127.0.0.1", host_listener.port)) as probe:
        assert probe.recv(4) == b"host"  # the listener works from the host
    kernel = await start_kernel(runtime)
    result = await kernel.run(CONNECT.format(port=host_listener.port))
    assert result.stdout.startswith("refused"), result
    assert host_listener.connections == 1
    # The sandbox has its own loopback, and nothing else.
    assert await kernel.value("[n for _, n in socket.if_nameindex()]") == ["lo"]


async def test_host_network_is_opt_in(runtime, start_kernel, host_listener):
    kernel = await start_kernel(runtime, network="host")
    result = await kernel.run(CONNECT.format(port=host_listener.port))
    assert result.stdout.strip() == "b'host'", result


async def test_host_processes_invisible(runtime, start_kernel):
    marker = f"{uuid.uuid4().int % 10**6}.25"
    host_process = subprocess.Popen(["sleep", marker])
    try:
        kernel = await start_kernel(runtime)
        pids = await kernel.value("sorted(int(p) for p in os.listdir('/proc') if p.isdigit())")
        assert len(pids) <= 3, pids  # the sandbox's init and the kernel
        cmdlines = await kernel.value(
            "[open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()]"
        )
        assert not any(marker.encode() in c for c in cmdlines), cmdlines
        result = await kernel.run(f"os.kill({host_process.pid}, 9)")
        assert result.error.get("ename") == "ProcessLookupError"
        assert host_process.poll() is None
    finally:
        host_process.kill()
        host_process.wait()


async def test_host_env_secrets_absent(runtime, start_kernel, monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("LANG", "C.UTF-8")
    kernel = await start_kernel(runtime)
    env = await kernel.value("dict(os.environ)")
    assert "JUPYTERHUB_API_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert secret not in repr(env)
    assert env["LANG"] == "C.UTF-8"  # allowlisted
    # Every process the kernel can see (a pooled sandbox's agent's environ is unreadable).
    assert (await kernel.run(
        "def readable(path):\n"
        "    try:\n"
        "        return open(path, 'rb').read()\n"
        "    except PermissionError:\n"
        "        return b''\n"
    )).ok  # fmt: skip
    found = await kernel.value(
        f"[p for p in os.listdir('/proc') if p.isdigit() and {secret!r}.encode() in "
        "readable(f'/proc/{p}/environ') + readable(f'/proc/{p}/cmdline')]"
    )
    assert found == []


async def test_no_capabilities_no_new_privileges(runtime, start_kernel):
    """None, but CAP_DAC_OVERRIDE when the server is root: in the kernel's own user
    namespace (or gVisor's Sentry), for the server's files in its workspace only."""
    kernel = await start_kernel(runtime)
    status = await kernel.value("open('/proc/self/status').read()")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    allowed = 1 << 1 if os.geteuid() == 0 else 0  # CAP_DAC_OVERRIDE
    assert int(fields["CapEff"], 16) in (0, allowed)
    assert int(fields["CapPrm"], 16) in (0, allowed)
    assert int(fields["CapBnd"], 16) in (0, allowed)
    assert fields.get("NoNewPrivs", "1").strip() == "1"  # gVisor's status has no such line
    if runtime_name(runtime) == "bubblewrap":  # gVisor's Sentry filters itself
        assert fields["Seccomp"].strip() == "2"
        result = await kernel.run(
            "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.unshare(0x10000000), ctypes.get_errno())"
        )
        assert result.stdout.split() == ["-1", "1"]  # EPERM


FORK_BOMB = """
import os, time
children, error = [], None
for _ in range(400):
    try:
        pid = os.fork()
    except OSError as exc:
        error = type(exc).__name__
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(children), error)
"""


async def test_fork_bomb_is_contained(runtime, start_kernel):
    kernel = await start_kernel(runtime, pids_limit=64)
    result = await kernel.run(FORK_BOMB, timeout=120)
    assert result.ok, result
    forked, error = result.stdout.split()
    assert int(forked) < 64 and error == "BlockingIOError", result.stdout
    assert (await kernel.run("print('alive')")).stdout.strip() == "alive"


MEMORY_BOMB = """
chunks = []
for _ in range(128):  # up to 2 GiB, 16 MiB at a time, every page touched
    chunks.append(bytearray(16 << 20))
print('allocated', len(chunks))
"""


async def test_memory_bomb_is_contained(runtime, start_kernel):
    kernel = await start_kernel(runtime, memory_limit="384M")
    msg_id = kernel.kc.execute(MEMORY_BOMB)
    provisioner = kernel.provisioner()
    # The limit ends the sandbox (the OOM killer) or the allocation fails: either way the
    # kernel never holds 2 GiB, and this process (the server) goes on.
    from conftest import async_wait_until

    died = await async_wait_until(lambda: provisioner.poll(), timeout=60)
    if not died:
        reply = await kernel.reply(msg_id, timeout=60)
        assert reply["content"].get("ename") == "MemoryError", reply["content"]


@pytest.mark.parametrize("platform", ["ptrace", "systrap"])
async def test_a_gvisor_sandbox_at_its_memory_limit_ends_whole(start_kernel, platform):
    """Under systrap the OOM killer takes one of gVisor's stub processes, which left the
    sandbox neither dead nor answering; the server ends it whole (under ptrace the
    Sentry is the one killed), and the kernel restarts."""
    from conftest import async_wait_until, require_runtime, wait_until

    require_runtime("gvisor")
    kernel = await start_kernel("gvisor", memory_limit="384M",
                                app_config=Config({"GVisorRuntime": {"platform": platform}}))
    sandbox = kernel.provisioner()._sandbox
    pids = sandbox.host_pids()
    assert len(pids) > 2  # the monitor, the gofer, the Sentry and its stubs
    kernel.kc.execute(MEMORY_BOMB)
    assert await async_wait_until(lambda: kernel.provisioner().poll(), timeout=60)
    if platform == "systrap":
        assert sandbox.oom_killed()  # ended by the server's watch
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 10)
    await kernel.km.restart_kernel(now=True)
    await kernel.ready()
    assert (await kernel.run("print('back')")).stdout.strip() == "back"


SYSTRAP = Config({"GVisorRuntime": {"platform": "systrap"}})


async def test_a_gvisor_sandbox_that_ends_by_itself_did_not_meet_its_limit(start_kernel,
                                                                           caplog):  # fmt: skip
    """runsc removes a sandbox's cgroup as the sandbox ends, which wakes the OOM notifier
    too: a kernel that exits by itself is not reported (or ended) as out of memory."""
    from conftest import async_wait_until, require_runtime, wait_until

    from sandbox_provisioner.limits import CGROUP_ROOT, cgroup_relpath

    require_runtime("gvisor")
    kernel = await start_kernel("gvisor", memory_limit="384M", app_config=SYSTRAP)
    sandbox = kernel.provisioner()._sandbox
    group = CGROUP_ROOT / "memory" / cgroup_relpath(sandbox.container_id)
    assert sandbox.info()["memory_watch"] and group.is_dir()
    kernel.kc.execute("import os; os._exit(3)")
    assert await async_wait_until(lambda: kernel.provisioner().poll(), timeout=30)
    assert wait_until(lambda: not group.exists(), 10)
    await asyncio.sleep(0.5)  # the notifier's wake-up, handled on this loop
    assert not sandbox.oom_killed()
    assert "memory limit" not in caplog.text


async def test_a_reattached_gvisor_sandbox_still_ends_at_its_memory_limit(start_kernel):
    """A server that takes a running systrap sandbox over (from the provisioner's persisted
    info) watches its memory too: the sandbox ends rather than hangs, with the original
    server's watch gone."""
    import json

    from conftest import async_wait_until, require_runtime

    from sandbox_provisioner import SandboxProvisioner

    require_runtime("gvisor")
    kernel = await start_kernel("gvisor", memory_limit="384M", app_config=SYSTRAP)
    info = await kernel.provisioner().get_provisioner_info()
    info = {**info, "sandbox": json.loads(json.dumps(info["sandbox"]))}
    kernel.provisioner()._sandbox._oom.close()  # as if the first server had gone
    other = SandboxProvisioner(kernel_id=info["kernel_id"], kernel_spec=kernel.km.kernel_spec)
    await other.load_provisioner_info(info)
    await asyncio.sleep(0.5)  # its watch registers
    kernel.kc.execute(MEMORY_BOMB)

    async def ended() -> bool:  # not its child: a reattached sandbox's end reads as code 0
        return await other.poll() is not None

    assert await async_wait_until(ended, timeout=60)
    assert other._sandbox.oom_killed()
    await other.cleanup()


async def test_memory_limit_without_cgroups_uses_rlimits(start_kernel):
    """What a server without root gets: the allocation fails, the kernel lives on."""
    from conftest import require_runtime

    require_runtime("bubblewrap")
    kernel = await start_kernel(
        "bubblewrap",
        memory_limit="1G",
        app_config=Config({"BubblewrapRuntime": {"limit_mechanism": "rlimit"}}),
    )
    assert kernel.provisioner()._sandbox.cgroup is None
    result = await kernel.run(MEMORY_BOMB, timeout=120)
    assert result.error.get("ename") == "MemoryError", result
    assert (await kernel.run("del chunks; print('alive')")).stdout.strip() == "alive"


CPU_BURN = """
import time
start = time.monotonic()
while time.monotonic() - start < 3:
    pass
"""


def _cpu_seconds(pids: list[int]) -> float:
    """Host CPU time (user + system) of ``pids``, threads included."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def test_cpu_limit(runtime, start_kernel):
    kernel = await start_kernel(runtime, cpu_limit=0.25)
    assert (await kernel.run("1")).ok  # gVisor starts its platform's stubs on first use
    pids = kernel.provisioner()._sandbox.host_pids()
    before = _cpu_seconds(pids)
    assert (await kernel.run(CPU_BURN, timeout=60)).ok
    used = _cpu_seconds(pids) - before
    # A quarter core for 3 s is 0.75 s of CPU, as the host counts it; unlimited, about 3 s.
    assert used < 1.6, used
