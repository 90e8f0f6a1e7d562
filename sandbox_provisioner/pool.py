"""Local warm pools: sandboxes started ahead of time, each with a kernel agent waiting in it.

A member is a sandbox of the kernelspec's runtime whose main process is the
kernel agent (:mod:`sandbox_provisioner.agent`), with ipykernel and the
configured modules imported and a kernel prepared on the member's own endpoint
(:mod:`sandbox_provisioner.agent.prepared`), but no workspace bound.
It sees the *stage* (``pool_root``, the directory all its possible workspaces
lie under) at :data:`STAGE_TARGET`, which only the agent uses. Taking a member
hands its agent the kernel's mount plan (the workspace at its host path, dot
files hidden, ``.git`` read-only: what a cold sandbox would have), its
environment and its IPC endpoint in the member's private directory; the agent
binds the workspace, unmounts the stage, seals the root and gives the prepared
kernel its notebook (or forks one), a kernel that holds no privilege the
sandbox's kernels must not have (:mod:`sandbox_provisioner.agent.confine`).

The server claims each member's agent with a key made for the pool and
known to no one else, over a Unix socket in a directory only the server
reaches. Members that die while waiting are replaced, never handed out; the
pool refills in the background (a moment after a take, so that a member's boot
does not slow the kernel just handed out) and ends with the server (``close_pools``, and
an exit handler for the members' directories).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import logging
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .agent.client import AgentClient
from .agent.protocol import CONTROLLER_KEYS_ENV, Refused, public_key_text
from .pyenv import is_within
from .runtimes import Sandbox, SandboxRuntime
from .runtimes.agent_driven import AgentDrivenSandbox
from .spec import Mount, MountKind, SandboxSpec

#: Where a member sees its stage (pool_root), and the same read-only, which read-only binds
#: come from (under gVisor a bind made read-only inside the sandbox still let an open with
#: O_TRUNC empty a file on the host); both unmounted once a kernel is assigned.
STAGE_TARGET = "/run/jupyter-sandbox/stage"
STAGE_RO_TARGET = "/run/jupyter-sandbox/stage-ro"
#: The agent's socket, in the member's directory on the host. The agent inherits it
#: listening: it is in no directory the sandbox sees, so no kernel can reach or replace it.
AGENT_SOCKET = "agent.sock"
#: Where the agent makes its socket when its runtime cannot hand it one (gVisor): the
#: member's ``agent/`` directory (the server's only), bound for the agent alone and hidden
#: with the stage once a kernel is assigned.
AGENT_DIR, AGENT_DIR_TARGET = "agent", "/run/jupyter-sandbox/agent"
MEMBER_START_TIMEOUT = 120.0
#: Seconds between handing a warm member out and starting its replacement: a member's boot
#: takes the CPU for seconds, and the kernel just handed out is answering its first
#: messages, which its user waits for. A take that finds no member refills at once.
REFILL_DELAY = 1.0

log = logging.getLogger(__name__)


class PoolFailing(RuntimeError):
    """Members keep failing to start; the message has the last reason."""


class PoolMember(AgentDrivenSandbox):
    """One pooled sandbox: its local sandbox, its private directory, its agent."""

    def __init__(self, runtime: SandboxRuntime, slot: Path, sandbox: Sandbox, log: Any):
        super().__init__(log)
        self.runtime, self.slot, self.sandbox = runtime, slot, sandbox
        #: The filesystem a kernel would inherit from this member, before its plan (the
        #: member's own mounts for its agent, such as the stage, left out).
        self.inherited: tuple[Mount, ...] = ()
        #: The kernel's mount plan (set when the member is taken).
        self.plan: list[dict[str, Any]] = []

    @property
    def socket(self) -> str:
        if self.runtime.inherits_sockets:
            return str(self.slot / AGENT_SOCKET)
        return str(self.slot / AGENT_DIR / AGENT_SOCKET)

    async def connect(self) -> AgentClient:
        assert self.session is not None
        return await AgentClient.resume(self.socket, self.session)

    def describe(self) -> str:
        return f"{self.runtime.name}, pooled"

    def start_fields(self, spec: SandboxSpec) -> dict[str, Any]:
        return {"mounts": self.plan, "connection": kernel_endpoint(self.slot), "cwd": spec.cwd}

    async def cleanup(self) -> None:
        self.drop_agent()
        await self.sandbox.cleanup()
        shutil.rmtree(self.slot, ignore_errors=True)
        _SLOTS.discard(self.slot)

    def host_pids(self) -> list[int]:
        return self.sandbox.host_pids()

    def oom_killed(self) -> bool:
        return bool(getattr(self.sandbox, "oom_killed", bool)())

    def info(self) -> dict[str, Any]:
        return {
            "pooled": True,
            "sandbox": self.sandbox.info(),
            "slot": str(self.slot),
            "session": base64.b64encode(self.session or b"").decode(),
            "connection": self.connection,
        }

    @classmethod
    def reattach(cls, runtime: SandboxRuntime, info: dict[str, Any], log: Any) -> PoolMember:
        """The member a kernel of another server process ran in (from its provisioner info)."""
        member = cls(runtime, Path(info["slot"]), runtime.reattach(info["sandbox"]), log)
        member.session = base64.b64decode(info["session"])
        member.connection = info.get("connection")
        member.starts = 1
        return member


def kernel_endpoint(slot: Path) -> dict[str, Any]:
    """Where a member's kernels listen: IPC sockets in its directory (``ipc/k-1`` ...)."""
    ports = dict(zip(("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"),
                     range(1, 6), strict=True))  # fmt: skip
    return {"transport": "ipc", "ip": str(slot / "ipc" / "k"), **ports}


class LocalPool:
    """``size`` members of one kernelspec configuration, kept started.

    ``member_spec(slot, controller_key, listen_fd)`` gives a member's spec and the
    filesystem a kernel inherits from it (what :func:`stage_plan` starts from);
    ``listen_fd`` is None where the runtime cannot hand the agent a socket."""

    def __init__(
        self,
        runtime: SandboxRuntime,
        member_spec: Callable[[Path, str, int | None], tuple[SandboxSpec, tuple[Mount, ...]]],
        *,
        size: int,
        state_dir: Path,
        log: Any = log,
    ):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.runtime, self.member_spec, self.size = runtime, member_spec, size
        self.state_dir, self.log = state_dir / f"p-{uuid.uuid4().hex[:8]}", log
        self._key = Ed25519PrivateKey.generate()  # this pool's controller key, never stored
        self._ready: list[PoolMember] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()
        self._closed = False
        self.failures = 0
        self.last_error = ""

    # -- taking -----------------------------------------------------------------------------
    async def take(self, timeout: float) -> PoolMember:
        """A live member (warm if one was waiting); the pool refills in the background
        (:data:`REFILL_DELAY` after it hands one out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waited = False
        while True:
            self.fill()
            while self._ready:
                member = self._ready.pop(0)
                if await member.sandbox.poll() is None and await self._answers(member):
                    member.warm = not waited
                    loop.call_later(REFILL_DELAY, self.fill)
                    return member
                self.log.warning("Pooled sandbox %s died while waiting; replacing it",
                                 member.slot.name)  # fmt: skip
                await member.cleanup()
            if self.failures >= 3 and not self._starting:
                self.failures = 0  # the next take tries again
                raise PoolFailing(f"pooled {self.runtime.name} sandboxes fail to start: "
                                  f"{self.last_error}")  # fmt: skip
            self.fill()
            self._arrived.clear()
            waited = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no pooled {self.runtime.name} sandbox within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    @staticmethod
    async def _answers(member: PoolMember) -> bool:
        try:
            await member._request("poll")
            return True
        except (ConnectionError, TimeoutError):
            return False

    # -- filling ----------------------------------------------------------------------------
    def fill(self) -> None:
        """Start members until ``size`` are ready or starting."""
        if self._closed:
            return
        while len(self._ready) + len(self._starting) < self.size:
            task = asyncio.get_running_loop().create_task(self._start_member())
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        if 0 < self.failures < 3:
            self.fill()  # try again; after three failures in a row, kernels start cold
        self._arrived.set()

    async def _start_member(self) -> None:
        slot = self.state_dir / f"m-{uuid.uuid4().hex[:12]}"
        # Traversable, not listable: a root server's sandboxes bind from here as the sandbox
        # uid (see sandbox_provisioner.identity); the names are random.
        for directory in (self.state_dir.parent, self.state_dir, slot):
            directory.mkdir(mode=0o711, exist_ok=True)
            directory.chmod(0o711)
        (slot / "ipc").mkdir(mode=0o700)
        _SLOTS.add(slot)
        listener = socket.socket(socket.AF_UNIX) if self.runtime.inherits_sockets else None
        try:
            if listener is not None:
                listener.bind(str(slot / AGENT_SOCKET))
                listener.listen(16)
            else:
                (slot / AGENT_DIR).mkdir(mode=0o700)
            spec, inherited = self.member_spec(slot, public_key_text(self._key),
                                               listener and listener.fileno())  # fmt: skip
            sandbox = await self.runtime.launch(spec)
        except Exception as exc:
            self._failed(slot, f"cannot start: {exc}")
            return
        finally:
            if listener is not None:
                listener.close()  # the agent holds it now
        member = PoolMember(self.runtime, slot, sandbox, self.log)
        member.inherited = inherited
        try:
            member.agent = await self._claim(member)
            member.session = member.agent.session
        except asyncio.CancelledError:  # the pool closes while this one starts
            await asyncio.shield(member.cleanup())
            raise
        except Exception as exc:
            with contextlib.suppress(OSError):
                exc.add_note(spec.log_path.read_text(errors="replace")[-2000:])
            await member.cleanup()
            self._failed(slot, f"its agent did not start: {exc} {getattr(exc, '__notes__', '')}")
            return
        if self._closed:
            await member.cleanup()
            return
        self.failures = 0
        self._ready.append(member)
        self._arrived.set()
        self._watch(member)

    def _watch(self, member: PoolMember) -> None:
        """Replace a waiting member as soon as it dies (the take-time check stays)."""

        async def watch() -> None:
            await member.sandbox.wait()
            if member in self._ready:
                self._ready.remove(member)
                self.log.warning("Pooled sandbox %s died while waiting; replacing it",
                                 member.slot.name)  # fmt: skip
                await member.cleanup()
                self.fill()

        task = asyncio.get_running_loop().create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _claim(self, member: PoolMember) -> AgentClient:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MEMBER_START_TIMEOUT
        while True:
            if await member.sandbox.poll() is not None:
                raise RuntimeError("the sandbox exited")
            try:
                return await AgentClient.claim(member.socket, self._key)
            except (ConnectionError, FileNotFoundError, OSError) as exc:
                if isinstance(exc, Refused) or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.02)

    def _failed(self, slot: Path, why: str) -> None:
        shutil.rmtree(slot, ignore_errors=True)
        _SLOTS.discard(slot)
        self.failures += 1
        self.last_error = why
        self.log.warning("Pooled %s sandbox failed (%d in a row): %s", self.runtime.name,
                         self.failures, why)  # fmt: skip

    # -- the end ----------------------------------------------------------------------------
    @property
    def ready(self) -> int:
        return len(self._ready)

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._starting, *self._watchers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        members, self._ready = self._ready, []
        await asyncio.gather(*(m.cleanup() for m in members), return_exceptions=True)
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()  # members still running a kernel keep theirs until it ends


#: Pools of this process, by the configuration their members share.
_POOLS: dict[str, LocalPool] = {}
#: Members' private directories, removed at exit whatever happened.
_SLOTS: set[Path] = set()


def pool_for(key: str, make: Callable[[], LocalPool]) -> LocalPool:
    pool = _POOLS.get(key)
    if pool is None or pool._closed:
        pool = _POOLS[key] = make()
    return pool


async def close_pools() -> None:
    """End every pool of this process and its members (the server's shutdown)."""
    pools = list(_POOLS.values())
    _POOLS.clear()
    await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)


@atexit.register
def _remove_slots() -> None:
    # Members die with the server (their monitors have a parent-death signal); their
    # directories would not.
    for slot in list(_SLOTS):
        shutil.rmtree(slot, ignore_errors=True)


def stage_plan(
    mounts: list[Mount], member: list[Mount], pool_root: str, check_inodes: bool = True
) -> list[dict] | None:
    """The agent's plan to turn a member's filesystem (``member``) into a kernel's
    (``mounts``): unmount what the kernel must not have, then mount what it lacks, with
    sources on the stage (and, with ``check_inodes``, the device and inode each must
    have). None when a source is outside ``pool_root``."""
    import os

    have, wanted = set(member), set(mounts)
    # What the member has and the kernel must not (its scratch directory), deepest first.
    plan: list[dict] = [{"kind": "unmount", "target": m.target}
                        for m in reversed(member) if m not in wanted]  # fmt: skip
    # ``mounts`` come parents first. A mount the member has is kept only if nothing the
    # plan mounts covers it: the kernel's Python environment inside its workspace must
    # be bound again, read-only, over the workspace bound here.
    mounted: list[str] = []
    for m in mounts:
        if m in have and not any(is_within(m.target, t) for t in mounted):
            continue
        mounted.append(m.target)
        source, expect = m.source, None
        if m.kind is MountKind.BIND:
            assert source is not None
            rel = os.path.relpath(source, pool_root)
            if rel == ".." or rel.startswith("../"):
                return None
            st = os.stat(source)  # the agent binds exactly this, or refuses
            stage = STAGE_TARGET if m.writable else STAGE_RO_TARGET
            source = os.path.normpath(os.path.join(stage, rel))
            expect = [st.st_dev, st.st_ino] if check_inodes else None
        plan.append({"kind": m.kind.value, "target": m.target, "source": source,
                     "writable": m.writable, "expect": expect})  # fmt: skip
    return plan


__all__ = ["CONTROLLER_KEYS_ENV", "STAGE_RO_TARGET", "STAGE_TARGET", "LocalPool", "PoolMember",
           "close_pools", "pool_for", "stage_plan"]  # fmt: skip
