"""The escapes a security review found, each tried for real from inside a kernel.

Every test runs the attack, or its harmless proof (writing a sysctl's current
value back, opening another process's memory for writing, planting a git
repository and running git on the host), from inside real kernels of each
runtime and start path it applies to: cold bubblewrap and gVisor, bubblewrap
from a warm pool, gVisor restored from a template. The kernel agent in a pod is
tried in test_kubernetes_kernels.py. CI runs this file as root and again as an
unprivileged user (test_unprivileged.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Kernel, async_wait_until, require_runtime, runtime_name

from sandbox_provisioner import identity, templates

#: Every way a local kernel gets its sandbox.
START_PATHS = ["bubblewrap", "gvisor", "bubblewrap-pooled", "gvisor-pooled", "gvisor-template"]
ROOT = os.geteuid() == 0
KCMP = {"x86_64": 312, "aarch64": 272}[platform.machine()]


@pytest.fixture(params=START_PATHS)
def start_path(request: pytest.FixtureRequest) -> str:
    require_runtime(request.param.removesuffix("-template"))
    return request.param


@pytest.fixture
def launch(start_kernel) -> Callable[..., Any]:
    """``await launch(start_path, **kw)``: a ready kernel started that way."""

    async def start(path: str, **kw: Any) -> Kernel:
        if path != "gvisor-template":
            return await start_kernel(path, **kw)
        first = await start_kernel("gvisor", snapshot_templates=True, **kw)
        await async_wait_until(lambda: any(t.ready or t.failed for t in
                                           templates._TEMPLATES.values()), timeout=120)  # fmt: skip
        assert [t for t in templates._TEMPLATES.values() if t.ready], "no template was built"
        await first.stop()
        kernel = await start_kernel("gvisor", snapshot_templates=True, **kw)
        reply = await kernel.kc.kernel_info(reply=True, timeout=30)
        assert "(from a template)" in reply["content"]["banner"]
        return kernel

    return start


async def define(kernel: Kernel, code: str) -> None:
    result = await kernel.run(code)
    assert result.ok, result


# -- 1. host root through /proc/sys ---------------------------------------------------------
WRITABLE_PROC = """
import os
def writable(path):
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    os.close(fd)
    return True
found = [os.path.join(d, f) for d, _, files in os.walk('/proc/sys') for f in files
         if writable(os.path.join(d, f))]
found += [p for p in ('/proc/sysrq-trigger',) if writable(p)]
"""

CORE_PATTERN_WRITE_BACK = """
try:
    current = open('/proc/sys/kernel/core_pattern').read()
    with open('/proc/sys/kernel/core_pattern', 'w') as f:
        f.write(current)
    outcome = 'written'
except OSError as exc:
    outcome = type(exc).__name__
"""


async def test_proc_sys_and_sysrq_cannot_be_written(start_path, launch):
    kernel = await launch(start_path)
    await define(kernel, CORE_PATTERN_WRITE_BACK)
    assert await kernel.value("outcome") != "written"
    await define(kernel, WRITABLE_PROC)
    assert await kernel.value("found") == []


async def test_kernel_is_never_host_root(start_path, launch, notebook_dir: Path):
    """On the host the kernel's process (bubblewrap) and the files it creates (every
    runtime) belong to the sandbox uid when the server is root, never to uid 0."""
    kernel = await launch(start_path)
    expected = identity.resolve("auto").uid
    assert (await kernel.run("open('made-by-kernel.txt', 'w').write('x')")).ok
    owner = (notebook_dir / "made-by-kernel.txt").stat().st_uid
    assert owner == expected and (owner != 0 or not ROOT)
    if runtime_name(start_path) == "bubblewrap":
        inside = await kernel.value("os.getpid()")
        sandbox = kernel.provisioner()._sandbox
        pids = sandbox.sandbox.host_pids() if hasattr(sandbox, "sandbox") else sandbox.host_pids()
        from sandbox_provisioner.runtimes.process import innermost_pid

        (host_pid,) = [p for p in pids if innermost_pid(p) == inside and p != pids[0]]
        status = Path(f"/proc/{host_pid}/status").read_text().splitlines()
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
        assert set(map(int, uids)) == {expected}, uids


@pytest.mark.skipif(not Path("/etc/ssl/private").exists(), reason="no /etc/ssl/private here")
async def test_etc_ssl_private_is_invisible(start_path, launch):
    kernel = await launch(start_path)
    assert await kernel.value(
        "os.listdir('/etc/ssl/private') if os.path.isdir('/etc/ssl/private') else []"
    ) == []


async def test_workspace_files_stay_usable(start_path, launch, notebook_dir: Path):
    """The server's files in the workspace are the kernel's to read and write, as before."""
    (notebook_dir / "data.csv").write_text("a,b\n")
    (notebook_dir / "data.csv").chmod(0o600)
    (notebook_dir / "private").mkdir(mode=0o700)
    kernel = await launch(start_path)
    assert await kernel.value("open('data.csv').read()") == "a,b\n"
    assert (await kernel.run("open('data.csv', 'a').write('1,2\\n')")).ok
    assert (await kernel.run("open('private/out.txt', 'w').write('ok')")).ok
    assert (await kernel.run("import shutil; shutil.rmtree('private')")).ok
    assert (notebook_dir / "data.csv").read_text() == "a,b\n1,2\n"
    assert not (notebook_dir / "private").exists()


# -- 2. a repository a kernel makes is not trusted by the host's git --------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_a_repository_the_kernel_plants_does_not_run_on_the_host(
    start_path, launch, notebook_dir: Path, tmp_path: Path
):
    if not ROOT:
        pytest.skip("an unprivileged server's kernels write as its own user, whom git trusts "
                    "(the README's security model says so)")  # fmt: skip
    marker = tmp_path / f"planted-{uuid.uuid4().hex}"
    kernel = await launch(start_path)
    config = f"[core]\n\tfsmonitor = touch {marker}\n"
    plant = (
        "import os\n"
        "for top in ('data', '.'):\n"
        "    g = os.path.join(top, '.git')\n"
        "    try:\n"
        "        os.makedirs(os.path.join(g, 'objects'), exist_ok=True)\n"
        "        os.makedirs(os.path.join(g, 'refs', 'heads'), exist_ok=True)\n"
        "        open(os.path.join(g, 'HEAD'), 'w').write('ref: refs/heads/main\\n')\n"
        f"        open(os.path.join(g, 'config'), 'w').write({config!r})\n"
        "    except OSError as exc:\n"
        "        print('refused', top, exc)\n"
    )  # fmt: skip
    assert (await kernel.run(plant)).ok
    assert (notebook_dir / "data" / ".git" / "config").exists()
    for where in (notebook_dir / "data", notebook_dir):
        git = subprocess.run(["git", "status"], cwd=where, capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})  # fmt: skip
        assert not marker.exists(), git
        if (where / ".git" / "config").exists():
            assert "dubious ownership" in git.stderr, git


# -- 3. the pooled sandbox's init and agent are out of the kernel's reach -------------------
OTHERS = """
import os, signal
def status(pid):
    return dict(line.split(':\\t', 1) for line in open(f'/proc/{pid}/status').read().splitlines()
                if ':\\t' in line)
def session(pid):  # as /proc tells it, so that every number is in the same namespace
    return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[3]
mine = session('self')
listed = [p for p in os.listdir('/proc') if p.isdigit()]
others = [p for p in listed if session(p) != mine]
seccomp = {p: status(p)['Seccomp'].strip() for p in listed}
def opens(pid, flags):
    try:
        os.close(os.open(f'/proc/{pid}/mem', flags))
        return True
    except OSError:
        return False
readable = [p for p in others if opens(p, os.O_RDONLY)]
writable = [p for p in others if opens(p, os.O_RDWR)]
def exists(pid):  # in the kernel's own pid namespace, where kill() names processes
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
targets = [p for p in range(1, 4096) if exists(p) and os.getsid(p) != os.getsid(0)]
"""


async def test_no_other_process_in_the_sandbox_is_open_to_the_kernel(start_path, launch):
    """At a first start: every process of the sandbox carries the filter (bubblewrap), and
    in a pooled one none outside the kernel's session (the agent, the zygote) opens. The
    prepared kernel, restarts and what a kernel leaves: the test after the next."""
    kernel = await launch(start_path)
    await define(kernel, OTHERS)
    if runtime_name(start_path) == "bubblewrap":
        # Every process in the sandbox carries the syscall filter, init and agent included.
        assert set((await kernel.value("seccomp")).values()) == {"2"}
    if start_path.endswith("-pooled"):
        assert await kernel.value("others"), "the agent and the zygote should be listed"
        assert await kernel.value("readable") == []
        assert await kernel.value("writable") == []


@pytest.fixture(params=["bubblewrap-pooled", "gvisor-pooled"])
def pooled_path(request: pytest.FixtureRequest) -> str:
    require_runtime(request.param)
    return request.param


async def test_the_kernel_cannot_end_its_agent(pooled_path, launch, notebook_dir: Path):
    kernel = await launch(pooled_path)
    await define(kernel, OTHERS)
    before = await kernel.value("targets")
    assert before, "the kernel's namespace has an init (the zygote)"
    for signum in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGQUIT", "SIGSTOP", "SIGKILL"):
        # Dropped (bubblewrap: a namespace's init) or refused (gVisor: another uid).
        await define(kernel, f"for p in targets:\n    try:\n        os.kill(p, signal.{signum})"
                             "\n    except PermissionError:\n        pass")  # fmt: skip
    await define(kernel, "os.kill(-1, signal.SIGKILL) if False else None")
    await asyncio.sleep(0.5)
    assert await kernel.value("[p for p in targets if exists(p)]") == before
    member = kernel.provisioner()._sandbox
    assert await member.sandbox.poll() is None
    # The agent and the zygote still serve: a restart in place works, in the same sandbox.
    await kernel.km.restart_kernel(now=True)
    await kernel.ready()
    assert kernel.provisioner()._sandbox is member
    assert (await kernel.run("print('restarted')")).stdout.strip() == "restarted"


#: What a kernel sees of the processes in its sandbox, every pid in /proc's namespace.
MEMORY = """
import os, subprocess, time
def listed():
    return sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
def parent(pid):
    try:
        return int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
def own():
    \"\"\"This kernel's process and its descendants.\"\"\"
    mine, pids = {int(os.readlink('/proc/self'))}, listed()
    while more := {p for p in pids if parent(p) in mine} - mine:
        mine |= more
    return mine
def reads_memory(pid):
    \"\"\"Whether this process reads bytes of ``pid``'s memory (Linux checks writing the
    same way; gVisor has no writable /proc/PID/mem). Reading, not just opening: a
    zombie's opens, and holds nothing.\"\"\"
    try:
        with open(f'/proc/{pid}/maps') as maps:
            start = next(int(line.split('-')[0], 16) for line in maps
                         if line.split()[1].startswith('r'))
        fd = os.open(f'/proc/{pid}/mem', os.O_RDONLY)
        try:
            return len(os.pread(fd, 8, start)) == 8
        finally:
            os.close(fd)
    except (OSError, StopIteration, ValueError):
        return False
def survey():
    pids = listed()
    return {'me': int(os.readlink('/proc/self')), 'listed': pids, 'own': sorted(own()),
            'open': [p for p in pids if reads_memory(p)]}
def running(argv):
    \"\"\"The pids whose command line is ``argv``.\"\"\"
    wanted = ('\\0'.join(argv) + '\\0').encode()
    found = []
    for pid in listed():
        try:
            if open(f'/proc/{pid}/cmdline', 'rb').read() == wanted:
                found.append(pid)
        except OSError:
            pass
    return found
child = subprocess.Popen(['sleep', '600'])
time.sleep(0.3)
"""
#: A process the kernel leaves behind, in a session of its own, its parent gone.
ORPHAN = ["sleep", "601"]


@pytest.mark.parametrize("first", ["prepared", "forked"])
async def test_a_pooled_kernel_reads_the_memory_of_its_own_processes_only(
    pooled_path, launch, first: str
):
    """Every process of a pooled sandbox (the agent, the zygote, the kernel prepared at boot,
    a previous kernel and what it left) against its kernel: the kernel reads the memory of
    its own process and its children, of nothing else; the kernel prepared at boot and
    not used (``forked``: the start sets a variable a kernel reads while it initializes)
    is gone when the kernel starts; after a restart in place, so are the previous kernel
    and a process it left running."""
    from sandbox_provisioner.provisioner import DEFAULT_ENV_ALLOWLIST

    kw: dict[str, Any] = {}
    if first == "forked":
        kw = {"env_allowlist": [*DEFAULT_ENV_ALLOWLIST, "PYTHONHASHSEED"],
              "env": {"PYTHONHASHSEED": "7"}}  # fmt: skip
    kernel = await launch(pooled_path, **kw)
    member = kernel.provisioner()._sandbox
    boot = (member.slot / "agent.log").read_text()
    (prepared,) = re.findall(r"kernel (\d+) prepared for the first start", boot)
    assert ("does not serve this start" in boot) == (first == "forked"), boot
    await define(kernel, MEMORY)
    seen = await kernel.value("survey()")
    assert len(seen["own"]) == 2, seen  # the kernel and its child
    assert set(seen["listed"]) - set(seen["own"]), "the agent and the zygote should be listed"
    assert seen["open"] == seen["own"], seen
    if first == "forked":
        assert int(prepared) not in seen["listed"], (prepared, seen)
    else:
        assert int(prepared) == seen["me"]

    await define(kernel, f"subprocess.run(['sh', '-c', 'setsid {' '.join(ORPHAN)} &'])\n"
                         "time.sleep(0.3)")  # fmt: skip
    (orphan,) = await kernel.value(f"running({ORPHAN!r})")
    if runtime_name(pooled_path) == "bubblewrap":  # gVisor: a tracer's descendants only
        assert await kernel.value(f"reads_memory({orphan})"), "the kernel reads what it left"
    assert orphan not in await kernel.value("own()")
    await kernel.km.restart_kernel(now=True)
    await kernel.ready()
    assert kernel.provisioner()._sandbox is member  # restarted in place
    await define(kernel, MEMORY)
    again = await kernel.value("survey()")
    assert seen["me"] not in again["listed"] and orphan not in again["listed"], again
    assert await kernel.value(f"running({ORPHAN!r})") == []
    assert len(again["own"]) == 2 and again["open"] == again["own"], again


async def test_a_pool_member_serves_one_claim_only(pooled_path, launch):
    """A member's agent obeys the one controller that claimed it (its pool, at boot): a
    second claim, even with the pool's own key, is refused; the member is handed out
    once and ends with its kernel, never to serve another."""
    from sandbox_provisioner import pool
    from sandbox_provisioner.agent.client import AgentClient
    from sandbox_provisioner.agent.protocol import Refused

    kernel = await launch(pooled_path)
    member = kernel.provisioner()._sandbox
    (members_pool,) = pool._POOLS.values()
    with pytest.raises(Refused, match="already claimed"):
        await AgentClient.claim(member.socket, members_pool._key)
    other = await launch(pooled_path)
    assert other.provisioner()._sandbox is not member
    assert member not in members_pool._ready
    await kernel.stop()
    assert await member.sandbox.poll() is not None and not member.slot.exists()
    assert member not in members_pool._ready


# -- 4. the kernel holds none of its agent's secrets ----------------------------------------
def _memory_contains(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which of ``needles`` appear in the readable memory of host process ``pid``."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found.update(n for n in needles if n in data)
    return sorted(found)


async def test_a_pooled_kernel_holds_no_session_key(launch):
    require_runtime("bubblewrap")
    if not ROOT:
        pytest.skip("reading another process's memory from the test needs root")
    kernel = await launch("bubblewrap-pooled")
    member = kernel.provisioner()._sandbox
    session = member.session
    assert session and len(session) == 32
    inside = await kernel.value("os.getpid()")
    from sandbox_provisioner.runtimes.process import innermost_pid

    pids = member.sandbox.host_pids()
    (host_pid,) = [p for p in pids if innermost_pid(p) == inside and p != pids[0]]
    needles = [session, base64.b64encode(session)]
    assert _memory_contains(host_pid, needles) == []
    # Nor does the kernel find its agent's state among its own objects.
    found = await kernel.value(
        "[type(o).__name__ for o in __import__('gc').get_objects() "
        "if type(o).__name__ in ('KernelAgent', 'Channel', 'Handshake')]"
    )
    assert found == []


async def test_the_pooled_agent_socket_is_not_in_the_kernels_reach(pooled_path, launch):
    kernel = await launch(pooled_path)
    sockets = await kernel.value(
        "[os.path.join(d, f) for top in ('/', ) for d, _, fs in os.walk(top) "
        "if not d.startswith(('/proc', '/sys', '/usr')) for f in fs "
        "if __import__('stat').S_ISSOCK(os.lstat(os.path.join(d, f)).st_mode)]"
    )
    # Only the kernel's own ZMQ endpoints: nothing that answers as an agent.
    ipc = kernel.km.get_connection_info()["ip"]
    assert sockets and all(s.startswith(f"{ipc}-") for s in sockets), (ipc, sockets)


# -- 2. start-up files, configuration and repositories stay the host's -----------------------
PLANT = """
import os
def attempt(what, action):
    try:
        action()
        return 'done'
    except OSError as exc:
        return type(exc).__name__
def write(path, text='planted'):
    return lambda: open(path, 'w').write(text)
def replace_with_file(path):
    def act():
        open(path + '.new', 'w').write('planted')
        os.replace(path + '.new', path)
    return act
outcomes = {
    'new .bash_profile': attempt(0, write('.bash_profile')),
    'new .gitconfig': attempt(0, write('.gitconfig')),
    'new .ssh2/authorized_keys': attempt(0, lambda: (os.makedirs('.ssh2'),
                                                    write('.ssh2/authorized_keys')())),
    'jupyter config': attempt(0, lambda: (os.makedirs('.jupyter', exist_ok=True),
                                         write('.jupyter/jupyter_server_config.py')())),
    'replace .bashrc link': attempt(0, replace_with_file('.bashrc')),
    'replace .profile link': attempt(0, replace_with_file('.profile')),
    'remove notes.txt': attempt(0, lambda: os.remove('notes.txt')),
    'new top-level file': attempt(0, write('out.csv')),
    'nested repository hook': attempt(0, write('proj/.git/hooks/pre-commit')),
    'bare repository config': attempt(0, write('bare.git/config')),
    'linked repository hook': attempt(0, write('tool/proj/.git/hooks/pre-commit')),
}
# Jupyter's directories are hidden behind an empty, private tmpfs: writes land there.
attempt(0, lambda: (os.makedirs(JCFG, exist_ok=True), write(JCFG + '/jupyter_server_config.py')()))
allowed = {
    'write notes.txt': attempt(0, write('notes.txt', 'edited')),
    'new file in data/': attempt(0, write('data/result.csv')),
}
"""


async def test_a_kernel_in_a_home_cannot_plant_what_the_host_runs(
    start_path, launch, tmp_path: Path, monkeypatch
):
    """The review's scenario: a notebook in the home directory, so the workspace is the
    home. Nothing the host runs later can be created, replaced or changed."""
    home = tmp_path / "home"
    for d in ("data", "dotfiles", "proj/.git/hooks", "bare.git/objects", "bare.git/refs"):
        (home / d).mkdir(parents=True)
    (home / "bare.git" / "HEAD").write_text("ref: refs/heads/main\n")
    (home / "bare.git" / "config").write_text("[core]\n\tbare = true\n")
    # A checkout whose .git is a link to its repository (the ``repo`` tool's layout).
    (home / "tool" / "gitdirs" / "proj" / "hooks").mkdir(parents=True)
    (home / "tool" / "proj").mkdir()
    (home / "tool" / "proj" / ".git").symlink_to("../gitdirs/proj")
    (home / "dotfiles" / "bashrc").write_text("echo hi\n")
    (home / ".bashrc").symlink_to("dotfiles/bashrc")
    (tmp_path / "profile").write_text("echo profile\n")
    (home / ".profile").symlink_to(tmp_path / "profile")
    (home / "notes.txt").write_text("mine\n")
    jcfg = home / "data" / "jupyter-config"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(jcfg))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file() and not p.is_symlink()}
    kernel = await launch(start_path, cwd=home)
    await define(kernel, f"JCFG = {str(jcfg)!r}\n" + PLANT)
    outcomes = await kernel.value("outcomes")
    assert [what for what, result in outcomes.items() if result == "done"] == []
    assert await kernel.value("allowed") == dict.fromkeys(
        ["write notes.txt", "new file in data/"], "done"
    )
    # On the host: nothing new at the top of the home, the links are links, nothing changed
    # but what the kernel may change.
    planted = {".bash_profile", ".gitconfig", ".ssh2", "out.csv", ".bashrc.new", ".profile.new"}
    assert not planted & {p.name for p in home.iterdir()}
    assert (home / ".bashrc").is_symlink() and (home / ".profile").is_symlink()
    assert not (home / "proj" / ".git" / "hooks" / "pre-commit").exists()
    assert not (home / "tool" / "gitdirs" / "proj" / "hooks" / "pre-commit").exists()
    assert not list(home.glob(".jupyter/*")) and not list(jcfg.glob("*"))
    after = {p: p.read_bytes() for p in before}
    changed = {p.relative_to(home).as_posix() for p in before if before[p] != after[p]}
    assert changed == {"notes.txt"}
    assert (home / "data" / "result.csv").exists()


#: Kernel code: ``attempt(action)`` is 'done', or the name of the OSError it raised.
ATTEMPT = """
import os
def attempt(action):
    try:
        action()
        return 'done'
    except OSError as exc:
        return type(exc).__name__
"""

#: What a kernel tries on the directories the host looks up commands in (set up by the test).
PLANT_ON_PATH = ATTEMPT + """
def write(path):
    def act():
        with open(path, 'w') as f:
            f.write('#!/bin/sh\\necho planted\\n')
    return act
def replace(path):
    def act():
        write(path + '.new')()
        os.replace(path + '.new', path)
    return act
def make(directory):
    return lambda: (os.makedirs(directory), write(os.path.join(directory, 'ls'))())
existing = {
    'new command in bin': attempt(write('bin/ls')),
    'overwritten bin/tool': attempt(write('bin/tool')),
    'replaced bin/tool': attempt(replace('bin/tool')),
    'chmod +x bin/README': attempt(lambda: os.chmod('bin/README', 0o755)),
    'chmod 0777 bin': attempt(lambda: os.chmod('bin', 0o777)),
    'link in bin': attempt(lambda: os.symlink('/usr/bin/true', 'bin/sudo')),
    'new command where .local/bin leads': attempt(write('dotfiles/local-bin/pip')),
    "new command on the server's PATH": attempt(write('tools/bin/git')),
}
missing = {
    'created bin': attempt(make('bin')),
    'created bin as a link': attempt(lambda: os.symlink('data', 'bin')),
    'created .local/bin': attempt(make('.local/bin')),
}
# Inside the hidden .local (an empty tmpfs): nothing of it reaches the host.
attempt(make('.local/bin'))
allowed = attempt(write('data/result.sh'))
"""


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: a link's destination, a directory's mode, a file's mode
    and content."""
    found: dict[str, tuple[Any, ...]] = {}
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if path.is_symlink():
            found[path.relative_to(root).as_posix()] = ("link", os.readlink(path))
        elif path.is_dir():
            found[path.relative_to(root).as_posix()] = ("dir", mode)
        else:
            found[path.relative_to(root).as_posix()] = ("file", mode, path.read_bytes())
    return found


@pytest.mark.parametrize("bin_dirs", ["existing", "missing"])
async def test_a_kernel_in_a_home_cannot_plant_a_command_on_path(
    start_path, launch, bin_dirs: str, tmp_path: Path, monkeypatch
):
    """The review's scenario, the next login shell's side: Debian's ~/.profile (and
    Fedora's ~/.bashrc, openSUSE's /etc/profile) put ~/bin and ~/.local/bin on PATH, and
    the server's own PATH is where it and what it starts look up commands. From a kernel
    whose workspace is the home, nothing can be created, replaced or made executable in
    them, nor can they be created; what is in ~/bin still runs."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    if bin_dirs == "existing":
        for d in ("bin", "dotfiles/local-bin", "tools/bin", ".local"):
            (home / d).mkdir(parents=True)
        (home / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
        (home / "bin" / "tool").chmod(0o755)
        (home / "bin" / "README").write_text("my scripts\n")
        (home / "dotfiles" / "local-bin" / "black").write_text("#!/bin/sh\n")
        (home / ".local" / "bin").symlink_to("../dotfiles/local-bin")
        monkeypatch.setenv("PATH", f"{home / 'tools' / 'bin'}:{os.environ['PATH']}")
    jupyter = tmp_path / "jupyter"  # the server's own directories, out of the home
    for name in ("CONFIG", "DATA", "RUNTIME"):
        monkeypatch.setenv(f"JUPYTER_{name}_DIR", str(jupyter / name.lower()))
    monkeypatch.setenv("IPYTHONDIR", str(jupyter / "ipython"))
    monkeypatch.setenv("HOME", str(home))
    before = _tree(home)
    kernel = await launch(start_path, cwd=home)
    await define(kernel, PLANT_ON_PATH)
    attempts = await kernel.value(bin_dirs)
    assert [what for what, result in attempts.items() if result == "done"] == [], attempts
    assert await kernel.value("allowed") == "done"
    if bin_dirs == "existing":  # read-only, not hidden: the kernel still runs what is there
        ran = "__import__('subprocess').run(['bin/tool'], capture_output=True).stdout"
        assert await kernel.value(ran) == b"tool\n"
    # On the host: the home as it was, but for the file written where the kernel may write.
    after = _tree(home)
    assert after.pop("data/result.sh")[0] == "file"
    assert after == before


async def test_a_kernel_cannot_change_the_python_environment_in_its_workspace(
    start_path, launch, notebook_dir: Path, monkeypatch
):
    """A project directory that holds its own Python environment, as when ``jupyter lab``
    runs in a project with a virtualenv inside: the workspace is writable, the environment
    in it is not, however the kernel got its sandbox. A ``.pth`` file planted there runs in
    the host's next Python (found in pooled sandboxes: the workspace, bound after the
    member was made, covered the environment's read-only bind). The environment here is
    the kernelspec's PYTHONPATH, one of the kernel's Python directories all the same."""
    from sandbox_provisioner import kernelspecs

    lib = notebook_dir / "env" / "site-packages"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "__init__.py").write_text("X = 1\n")
    plain = kernelspecs.spec_for_runtime

    def with_pythonpath(name: str, **config: Any) -> Any:
        spec = plain(name, **config)
        spec.env = {**spec.env, "PYTHONPATH": str(lib)}
        return spec

    monkeypatch.setattr(kernelspecs, "spec_for_runtime", with_pythonpath)
    kernel = await launch(start_path)
    if start_path.endswith("-pooled"):  # a pool's member, handed the kernel's mount plan
        reply = await kernel.kc.kernel_info(reply=True, timeout=30)
        assert f"{runtime_name(start_path)}, pooled (" in reply["content"]["banner"]
    await define(kernel, ATTEMPT + f"""
LIB = {str(lib)!r}
outcomes = {{
    'new .pth': attempt(lambda: open(os.path.join(LIB, 'planted.pth'), 'w').write('x')),
    'changed module': attempt(lambda: open(os.path.join(LIB, 'pkg', '__init__.py'), 'a')),
    'new module': attempt(lambda: open(os.path.join(LIB, 'pkg', 'new.py'), 'w').write('x')),
}}
import pkg
allowed = attempt(lambda: open('result.csv', 'w').write('1'))
""")
    assert await kernel.value("pkg.X") == 1  # the environment is the kernel's own
    outcomes = await kernel.value("outcomes")
    assert len(outcomes) == 3 and not [what for what, r in outcomes.items() if r == "done"]
    assert await kernel.value("allowed") == "done"
    assert sorted(p.name for p in lib.rglob("*") if "__pycache__" not in p.parts) == [
        "__init__.py", "pkg"]  # fmt: skip
    assert (lib / "pkg" / "__init__.py").read_text() == "X = 1\n"
    assert (notebook_dir / "result.csv").exists()


# -- 5. the lesser findings ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["bubblewrap", "bubblewrap-pooled"])
async def test_personality_and_kcmp_are_refused(path, launch):
    require_runtime("bubblewrap")
    kernel = await launch(path)
    result = await kernel.run(
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True)\n"
        "no_aslr = libc.personality(0x0040000), ctypes.get_errno()\n"
        "exec_reads = libc.personality(0x0400000), ctypes.get_errno()\n"
        f"kcmp = libc.syscall({KCMP}, os.getpid(), os.getpid(), 0, 0, 0), ctypes.get_errno()\n"
        "print(no_aslr, exec_reads, kcmp)"
    )
    assert result.stdout.split() == ["(-1,", "1)"] * 3, result


@pytest.mark.parametrize("path", ["bubblewrap", "gvisor", "bubblewrap-pooled", "gvisor-pooled"])
async def test_a_workspace_swapped_for_a_symlink_after_the_plan_is_not_bound(
    path, start_kernel, notebook_dir: Path, tmp_path: Path, monkeypatch
):
    """Between the plan (which resolved the workspace) and the mount, another process that
    writes the parent swaps the directory for a symlink to a secret: nothing is bound."""
    require_runtime(path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("secret")
    from sandbox_provisioner.launch.plan import SandboxStartError
    from sandbox_provisioner.pool import PoolMember
    from sandbox_provisioner.runtimes import runtime_classes

    def swap() -> None:
        notebook_dir.rename(notebook_dir.with_name("moved"))
        notebook_dir.symlink_to(secret)

    if path.endswith("-pooled"):
        original = PoolMember.start_kernel

        async def swapped(self, spec):  # after the plan, before the agent binds it
            swap()
            return await original(self, spec)

        monkeypatch.setattr(PoolMember, "start_kernel", swapped)
    else:
        cls = runtime_classes()[runtime_name(path)]
        original_launch = cls.launch

        async def swapped_launch(self, spec):
            swap()
            return await original_launch(self, spec)

        monkeypatch.setattr(cls, "launch", swapped_launch)
    with pytest.raises((SandboxStartError, RuntimeError)) as error:
        kernel = await start_kernel(path)
        # Had it started, the secret would be in its workspace.
        assert not await kernel.value("os.path.exists('key.txt')")
    assert any(word in str(error.value) for word in ("symlink", "replaced", "Race")), error.value


@pytest.mark.skipif(not ROOT, reason="mounting on the host needs root")
@pytest.mark.parametrize("path", ["bubblewrap", "gvisor", "bubblewrap-pooled", "gvisor-pooled"])
async def test_read_only_binds_are_read_only_below_too(path, start_kernel, notebook_dir: Path):
    """A mount inside a read-only bind (here, in a repository) is read-only as well."""
    require_runtime(path)
    inner = notebook_dir / ".git" / "mounted"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        kernel = await start_kernel(path)
        result = await kernel.run("open('.git/mounted/planted', 'w').write('x')")
        assert result.error.get("ename") in ("OSError", "PermissionError"), result
        assert not (inner / "planted").exists()
        await kernel.stop()
    finally:
        subprocess.run(["umount", "-l", str(inner)], check=True)
