"""The in-sandbox kernel agent: waits, warm, for its one controller, then runs its kernel.

It is the sandbox's main process (``python -m sandbox_provisioner.agent serve``).
It preloads ipykernel, listens on its port and obeys the first controller
that claims it with a pinned key (:mod:`.protocol`). Requests:

``start``  fork a kernel with the given arguments, environment and directory,
           reply with its connection info once its sockets are bound;
``signal`` deliver a signal to the kernel's process group (interrupt);
``poll``   whether the kernel runs, else its exit code;
``stop``   end the kernel and every other process in the sandbox, so the next
           ``start`` (a restart in place) begins from a clean sandbox;
``log``    the tail of the kernel's output.

In a pooled local sandbox (``--confine``) the first ``start`` also carries
the kernel's mount plan: the agent binds the workspace from its stage and
seals the sandbox (:mod:`.confine`), and each kernel drops every privilege
before it runs. There the agent listens on a Unix socket in a directory only
the server can reach, and the kernel uses IPC sockets next to it.

The kernel keeps its ports and message key across restarts in place, so
clients that reconnect by port keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import logging
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import kernel as kernel_process
from .protocol import (
    CONTROLLER_KEYS_ENV,
    PORT_NAMES,
    Channel,
    Handshake,
    ProtocolError,
    Refused,
    kernel_key,
    read_frame,
    resume_proof,
    unb64,
    write_frame,
)

log = logging.getLogger("jupyter-sandbox-agent")
HANDSHAKE_TIMEOUT = 10.0
LOG_TAIL = 4000
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class RunningKernel:
    pid: int
    log_path: str
    exit_code: int | None = None


@dataclass
class KernelAgent:
    """The agent's state: its trusted keys, its one session, its kernel."""

    keys: list[Ed25519PublicKey]
    state_dir: Path
    workdir: str
    base_env: dict[str, str] = field(default_factory=dict)
    #: Pooled local sandbox: the stage to bind workspaces from, and kernels drop privileges.
    stage: str | None = None
    confine: bool = False
    session: bytes | None = None
    kernel: RunningKernel | None = None
    ports: dict[str, int] | None = None
    sealed: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _seccomp: Any = None

    # -- connections ------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        handshake = Handshake.new()
        try:
            await write_frame(writer, handshake.greeting(self.session is not None))
            frame = await asyncio.wait_for(read_frame(reader), HANDSHAKE_TIMEOUT)
            if frame is None:
                return
            self._authenticate(frame, handshake)
            assert self.session is not None
            channel = Channel(reader, writer, self.session, handshake.nonce, is_agent=True)
            await channel.send({"ok": True})
            local = writer.get_extra_info("sockname")
            while (body := await channel.recv()) is not None:
                await channel.send(await self._dispatch(body, local))
        except Refused as exc:
            log.warning("refused a controller at %s: %s", peer, exc)
            with contextlib.suppress(Exception):
                await write_frame(writer, {"refused": str(exc)})
        except (ProtocolError, TimeoutError, ConnectionError) as exc:
            log.warning("dropped a connection from %s: %s", peer, exc)
        finally:
            writer.close()

    def _authenticate(self, frame: dict[str, Any], handshake: Handshake) -> None:
        op = frame.get("op")
        if op == "claim":
            # No await between the check and the assignment: two claims cannot both win.
            if self.session is not None:
                raise Refused("this sandbox is already claimed by another controller")
            self.session = handshake.verify_claim(frame, self.keys)
            log.info("claimed by a controller")
        elif op == "resume":
            proof = unb64(frame.get("proof"))
            expected = resume_proof(self.session, handshake.nonce) if self.session else b""
            if not self.session or not hmac.compare_digest(proof, expected):
                raise Refused("not this sandbox's controller")
        else:
            raise ProtocolError(f"expected claim or resume, got {op!r}")

    async def _dispatch(self, body: dict[str, Any], local: Any) -> dict[str, Any]:
        op = body.get("op")
        try:
            if op == "start":
                async with self._lock:
                    return await self._start(body, local)
            if op == "signal":
                return self._signal(int(body["signum"]))
            if op == "poll":
                return {"ok": True, "exit_code": self._poll()}
            if op == "stop":
                async with self._lock:
                    return {"ok": True, "exit_code": await self._stop(float(body.get("grace", 0)))}
            if op == "log":
                return {"ok": True, "log": self._log_tail()}
            return {"ok": False, "error": f"unknown request {op!r}"}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad {op} request: {exc}"}
        except OSError as exc:  # a mount of the plan, a fork: the sandbox cannot serve
            return {"ok": False, "error": f"{op} failed: {exc}"}

    # -- the kernel -------------------------------------------------------------------------
    async def _start(self, body: dict[str, Any], local: Any) -> dict[str, Any]:
        if self._poll() is None:
            return {"ok": False, "error": "a kernel is already running in this sandbox"}
        args = [str(a) for a in body.get("args", [])]
        env = {**self.base_env, **{str(k): str(v) for k, v in body.get("env", {}).items()}}
        if self.confine and not self.sealed:
            from .confine import apply_plan

            apply_plan(list(body.get("mounts", [])), self.stage, self._empty_file())
            self.sealed = True
        assert self.session is not None
        info = {**self._endpoint(body, local), "key": kernel_key(self.session),
                "signature_scheme": "hmac-sha256"}  # fmt: skip
        launch = kernel_process.KernelLaunch(
            connection_file=str(self.state_dir / "kernel.json"),
            args=args,
            env=env,
            cwd=str(body.get("cwd") or self.workdir),
            log_path=str(self.state_dir / "kernel.log"),
            prepare=self._drop_privileges if self.confine else None,
        )
        launch.write_connection_file(info)
        pid, ready = kernel_process.fork_kernel(launch)
        self.kernel = RunningKernel(pid, launch.log_path)
        try:
            started = await self._wait_ready(ready, float(body.get("timeout", 60)))
        finally:
            os.close(ready)
        if not started:
            code = await self._stop(0)
            return {"ok": False, "error": f"the kernel exited with code {code} while starting",
                    "log": self._log_tail()}  # fmt: skip
        info.pop("key")
        return {"ok": True, "pid": pid, "connection": info}

    def _endpoint(self, body: dict[str, Any], local: Any) -> dict[str, Any]:
        """Where the kernel listens: the IPC path the controller gave (local pools), else
        TCP on the address the controller reached the agent at (the pod IP)."""
        wanted = body.get("connection") or {}
        if wanted.get("transport") == "ipc":
            ports = {name: int(wanted[name]) for name in PORT_NAMES}
            return {"transport": "ipc", "ip": str(wanted["ip"]), **ports}
        ip = local[0] if isinstance(local, tuple) else "127.0.0.1"
        if self.ports is None:
            self.ports = _free_ports(ip, len(PORT_NAMES))
        return {"transport": "tcp", "ip": ip, **self.ports}

    def _empty_file(self) -> str:
        path = self.state_dir / "empty"
        path.touch(mode=0o444, exist_ok=True)
        return str(path)

    def _drop_privileges(self) -> None:
        from .confine import drop_privileges

        drop_privileges(self._seccomp)

    async def _wait_ready(self, ready: int, timeout: float) -> bool:
        os.set_blocking(ready, False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.read(ready, 1) == b"R":
                    return True
            except BlockingIOError:
                pass
            if self._poll() is not None:
                return False
            await asyncio.sleep(0.005)
        return False

    def _reap(self) -> None:
        """Collect every exited child (orphans land here when the agent is pid 1)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.kernel is not None and pid == self.kernel.pid:
                self.kernel.exit_code = os.waitstatus_to_exitcode(status)

    def _poll(self) -> int | None:
        if self.kernel is None:
            return 0
        self._reap()
        return self.kernel.exit_code

    def _signal(self, signum: int) -> dict[str, Any]:
        if self._poll() is not None:
            return {"ok": False, "error": "no kernel is running"}
        assert self.kernel is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.kernel.pid, signum)
        return {"ok": True}

    async def _stop(self, grace: float) -> int | None:
        """End the kernel (SIGTERM, ``grace`` seconds, SIGKILL) and every stray process."""
        if self.kernel is not None and self._poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.kernel.pid, signal.SIGTERM if grace else signal.SIGKILL)
            deadline = time.monotonic() + grace
            while self._poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        for _ in range(100):
            if not _kill_others():
                break
            await asyncio.sleep(0.01)
            self._reap()
        self._reap()
        return self.kernel.exit_code if self.kernel else None

    def _log_tail(self) -> str:
        path = self.kernel.log_path if self.kernel else str(self.state_dir / "kernel.log")
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _free_ports(ip: str, count: int) -> dict[str, int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
            s.bind((ip, 0))
            socks.append(s)
        return {name: s.getsockname()[1] for name, s in zip(PORT_NAMES, socks, strict=True)}
    finally:
        for s in socks:
            s.close()


def _kill_others() -> bool:
    """SIGKILL every descendant of this agent (it is their subreaper, so orphans count)."""
    me = os.getpid()
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parents[int(entry)] = _ppid(int(entry))
    killed = False
    for pid in parents:
        ancestor, seen = parents.get(pid, 0), 0
        while ancestor not in (0, 1, me) and seen < 64:
            ancestor, seen = parents.get(ancestor, 0), seen + 1
        if ancestor == me and pid != me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed = True
    return killed


def become_subreaper() -> None:
    """Orphaned kernel children re-parent to the agent, which reaps and can end them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a subreaper: %s", os.strerror(ctypes.get_errno()))


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


async def serve(
    host: str,
    port: int,
    keys: list[Ed25519PublicKey],
    *,
    workdir: str,
    unix: str | None = None,
    stage: str | None = None,
    confine: bool = False,
) -> None:
    """Run the agent until cancelled (or SIGTERM): on ``unix`` if given, else TCP."""
    become_subreaper()
    with contextlib.suppress(OSError):
        os.makedirs(workdir, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="jupyter-sandbox-agent-"))
    base_env = {k: v for k, v in os.environ.items() if k != CONTROLLER_KEYS_ENV}
    agent = KernelAgent(keys, state_dir, workdir, base_env, stage=stage, confine=confine)
    if confine:
        from ..seccomp import build_filter

        agent._seccomp = build_filter()  # built once, loaded by each kernel
    # Our own socket: asyncio would resolve a host name on an executor thread, and the
    # agent forks, so it must never have started a thread.
    if unix:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(unix)
        where = unix
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        where = "{}:{}".format(*sock.getsockname()[:2])
    if unix:
        server = await asyncio.start_unix_server(agent.handle, sock=sock, limit=256 * 1024)
    else:
        server = await asyncio.start_server(agent.handle, sock=sock, limit=256 * 1024)
    log.info("kernel agent listening on %s", where)
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.cancel)
    try:
        async with server:
            while not stopped.done():
                agent._reap()
                await asyncio.wait([stopped], timeout=1.0)
    finally:
        with contextlib.suppress(Exception):
            await agent._stop(1.0)
