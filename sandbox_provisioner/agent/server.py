"""The in-sandbox kernel agent: waits, warm, for its one controller, then runs its kernel.

It is the sandbox's main process (``python -m sandbox_provisioner.agent serve``).
At boot, before it holds any secret, it forks the *zygote* (:mod:`.zygote`),
which preloads ipykernel and forks every kernel (in a pooled sandbox, in a pid
namespace of the zygote's own, where the agent has no pid); the agent itself
is not dumpable (no kernel can read its memory). It listens on its port, or on a
socket it inherited, and obeys the first controller that claims it with a
pinned key (:mod:`.protocol`). Requests:

``start``  have the zygote fork a kernel with the given arguments, environment
           and directory (or give them to the kernel prepared at boot:
           :mod:`.prepared`); reply with its connection info once its sockets are bound;
``signal`` deliver a signal to the kernel's process group (interrupt);
``poll``   whether the kernel runs, else its exit code;
``stop``   end the kernel and every other process in the sandbox, so the next
           ``start`` (a restart in place) begins from a clean sandbox;
``log``    the tail of the kernel's output.

In a pooled local sandbox (``--confine``) the agent is the sandbox's pid 1, and
the first ``start`` also carries the kernel's mount plan: the agent binds the
workspace from its stage, seals the sandbox (:mod:`.confine`), then gives up
its capabilities and takes the kernel's seccomp filter. Its socket was made
listening by the server, in a directory no sandbox sees, and handed over.

Signals from inside the sandbox (a kernel's) do not stop the agent; a SIGTERM
from outside it (the kubelet, the server) does.

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
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import kernel as kernel_process
from .prepared import PreparedKernel
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
from .zygote import Zygote, ZygoteDied

log = logging.getLogger("jupyter-sandbox-agent")
HANDSHAKE_TIMEOUT = 10.0
#: Connections not yet authenticated, at most (more are closed at once).
MAX_PENDING = 16
LOG_TAIL = 4000
_PR_SET_CHILD_SUBREAPER = 36
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


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
    zygote: Zygote
    base_env: dict[str, str] = field(default_factory=dict)
    #: Pooled local sandbox: the stages to bind workspaces from; removed once bound.
    stages: tuple[str, ...] = ()
    #: Where the agent made its socket (a gVisor member's): covered once sealed.
    socket_dir: str | None = None
    confine: bool = False
    #: Capabilities the sealed agent keeps: CAP_KILL where its kernels are another uid
    #: (a gVisor member's agent is the sandbox's root), to signal and stop them.
    keep_caps: tuple[str, ...] = ()
    session: bytes | None = None
    kernel: RunningKernel | None = None
    #: The kernel prepared at boot for the first start (pooled local sandboxes).
    prepared: PreparedKernel | None = None
    #: The seccomp filter the agent takes when it seals (built at boot: see :func:`serve`).
    kernel_filter: Any = None
    ports: dict[str, int] | None = None
    sealed: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _pending: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_PENDING))

    # -- connections ------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending.locked():
            writer.close()  # too many connections still to authenticate: not this one
            return
        peer = writer.get_extra_info("peername")
        try:
            async with self._pending:
                channel = await self._handshake(reader, writer)
            if channel is None:
                return
            local = writer.get_extra_info("sockname")
            while (body := await channel.recv()) is not None:
                await channel.send(await self._dispatch(body, local))
        except Refused as exc:
            log.warning("refused a controller at %s: %s", peer, exc)
            with contextlib.suppress(Exception):
                await write_frame(writer, {"refused": str(exc)})
        except (ProtocolError, TimeoutError, ConnectionError) as exc:
            log.warning("dropped a connection from %s: %s", peer, exc)
        except Exception:  # nothing a peer sends may end the agent
            log.exception("dropped a connection from %s", peer)
        finally:
            writer.close()

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Channel | None:
        handshake = Handshake.new()
        await write_frame(writer, handshake.greeting(self.session is not None))
        frame = await asyncio.wait_for(read_frame(reader), HANDSHAKE_TIMEOUT)
        if frame is None:
            return None
        self._authenticate(frame, handshake)
        assert self.session is not None
        channel = Channel(reader, writer, self.session, handshake.nonce, is_agent=True)
        await channel.send({"ok": True})
        return channel

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
        except ZygoteDied as exc:
            return {"ok": False, "error": str(exc)}

    # -- the kernel -------------------------------------------------------------------------
    async def _start(self, body: dict[str, Any], local: Any) -> dict[str, Any]:
        if self._poll() is None:
            return {"ok": False, "error": "a kernel is already running in this sandbox"}
        args = [str(a) for a in body.get("args", [])]
        env = {**self.base_env, **{str(k): str(v) for k, v in body.get("env", {}).items()}}
        endpoint = self._endpoint(body, local)
        timeout = float(body.get("timeout", 60))
        prepared, go = await self._take_prepared(args, env, endpoint, timeout)
        if self.confine and not self.sealed:
            try:
                self._seal(list(body.get("mounts", [])))
            except BaseException:
                if prepared:
                    prepared.discard()
                raise
        assert self.session is not None
        info = {**endpoint, "key": kernel_key(self.session), "signature_scheme": "hmac-sha256"}
        launch = self._launch(args, env, str(body.get("cwd") or self.workdir))
        launch.write_connection_file(info)
        if prepared and go is not None:
            pid, ready_r = prepared.pid, prepared.go(go, launch.cwd)
            log.info("kernel %d (prepared at boot) given its notebook", pid)
        else:
            pid, ready_r = await self.zygote.start_kernel(launch)
        self.kernel = RunningKernel(pid, launch.log_path)
        try:
            started = await kernel_process.read_ready(ready_r, timeout) == b"R"
        finally:
            os.close(ready_r)
        if not started:
            code = await self._stop(0)
            return {"ok": False, "error": f"the kernel exited with code {code} while starting",
                    "log": self._log_tail()}  # fmt: skip
        info.pop("key")
        return {"ok": True, "pid": pid, "connection": info}

    async def _take_prepared(
        self, args: list[str], env: dict[str, str], endpoint: dict[str, Any], timeout: float
    ) -> tuple[PreparedKernel | None, dict[str, Any] | None]:
        """The kernel prepared at boot and its go, once it has initialized (before the
        seal changes the filesystem under it); (None, None) if there is none or it does
        not fit this start (it is ended then)."""
        prepared, self.prepared = self.prepared, None
        if prepared is None:
            return None, None
        go = prepared.go_for(args, env, endpoint)
        if go is not None and await prepared.initialized(timeout):
            return prepared, go
        prepared.discard()
        log.info("the kernel prepared at boot does not serve this start: forking one")
        return None, None

    def _launch(
        self, args: list[str], env: dict[str, str], cwd: str
    ) -> kernel_process.KernelLaunch:
        """A kernel start in this sandbox: its connection file and log are the agent's."""
        return kernel_process.KernelLaunch(
            connection_file=str(self.state_dir / "kernel.json"), args=args, env=env, cwd=cwd,
            log_path=str(self.state_dir / "kernel.log"),
        )  # fmt: skip

    async def prepare(self, endpoint: dict[str, Any], args: list[str]) -> None:
        """Fork the kernel the first start will use (:mod:`.prepared`), with a throwaway
        key: the real one is written with the start. A failure only costs that speed."""
        async with self._lock:
            if self.kernel is not None:
                return  # a start came first
            info = {**endpoint, "key": secrets.token_hex(32), "signature_scheme": "hmac-sha256"}
            launch = self._launch(args, self.base_env, "/")  # its directory comes with its go
            launch.write_connection_file(info)
            try:
                self.prepared = await PreparedKernel.fork(self.zygote, launch, endpoint)
            except (OSError, ZygoteDied) as exc:
                log.warning("no kernel prepared ahead (the first start forks one): %s", exc)
                return
            log.info("kernel %d prepared for the first start", self.prepared.pid)

    def _seal(self, mounts: list[dict[str, Any]]) -> None:
        """Bind the kernel's plan, then keep no capability and take the kernel's filter."""
        from .confine import apply_plan, output_inside, restrict

        # User code runs from here on (a kernel prepared at boot gets its go after this).
        output_inside(str(self.state_dir / "agent.log"))
        cover = [self.socket_dir] if self.socket_dir else []
        apply_plan(mounts, self.stages, cover, self._empty_file())
        self.sealed = True
        if self.kernel_filter is None:  # never sealed without one
            from ..seccomp import build_filter

            self.kernel_filter = build_filter()
        restrict(self.keep_caps, self.kernel_filter)

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

    def kernel_exited(self, pid: int, code: int) -> None:
        """The zygote reaped a kernel (it is their parent)."""
        if self.kernel is not None and pid == self.kernel.pid:
            self.kernel.exit_code = code
        if self.prepared is not None and pid == self.prepared.pid:
            log.warning("the kernel prepared at boot exited (code %d)", code)
            self.prepared.alive = False
            self.prepared.discard()
            self.prepared = None

    def _reap(self) -> None:
        """Collect every exited child of ours: orphans (we are their subreaper), the zygote."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.zygote.pid:
                log.warning("the kernel factory exited: this sandbox starts no more kernels")
                self.zygote.close()
                if self.kernel is not None and self.kernel.exit_code is None:
                    self.kernel.exit_code = -signal.SIGKILL  # it ended with the factory

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
        if self.prepared is not None:
            self.prepared.discard()
            self.prepared = None
        if self.kernel is not None and self._poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.kernel.pid, signal.SIGTERM if grace else signal.SIGKILL)
            deadline = time.monotonic() + grace
            while self._poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        for _ in range(100):
            if not _kill_others(spare=self.zygote.pid):
                break
            await asyncio.sleep(0.01)
            self._reap()
        # The zygote reaps the kernel and says so; a dead zygote took its kernels with it.
        deadline = time.monotonic() + 5
        while self._poll() is None and self.zygote.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
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


def _prepared_endpoint(
    agent: KernelAgent, wanted: dict[str, Any], host: str
) -> dict[str, Any] | None:
    """Where a kernel prepared at boot listens: the IPC endpoint given (a local pool's), or
    for ``{"transport": "tcp"}`` (a pod's) ports chosen now on ``host``, the address the
    controller reaches the agent at, which its starts then ask for; None if the agent
    listens on every address (which one a controller uses is known only then)."""
    if wanted.get("transport") != "tcp":
        return wanted
    if host in ("", "0.0.0.0", "::"):
        log.info("no kernel prepared ahead: the agent listens on every address")
        return None
    agent.ports = _free_ports(host, len(PORT_NAMES))
    return {"transport": "tcp", "ip": host, **agent.ports}


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


def _parents() -> dict[int, int]:
    return {int(e): _ppid(int(e)) for e in os.listdir("/proc") if e.isdigit()}


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    for _ in range(64):
        pid = parents.get(pid, 0)
        if pid == ancestor:
            return True
        if pid in (0, 1):
            return False
    return False


def _kill_others(spare: int) -> bool:
    """SIGKILL every descendant of this agent (kernels, what they left behind) but the
    zygote ``spare``."""
    me, parents = os.getpid(), _parents()
    killed = False
    for pid in parents:
        if pid in (me, spare) or not _descends(pid, me, parents):
            continue
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


def _from_inside(pid: int) -> bool:
    """Whether a signal's sender is one of this agent's processes (a kernel): 0 is a
    sender outside this pid namespace (the kubelet, the server)."""
    return pid != 0 and (pid == os.getpid() or _descends(pid, os.getpid(), _parents()))


def _watch_stop_signals(loop: asyncio.AbstractEventLoop, stop: Any, kernels_apart: bool) -> None:
    """Stop on SIGTERM, SIGINT or SIGHUP from outside; ignore the kernel's.

    With ``kernels_apart`` (kernels in the zygote's pid namespace, where this process has
    no pid) no kernel can signal us: plain handlers. Otherwise the signals are blocked
    and taken by a thread with sigwaitinfo, which tells who sent each. (A process that
    made a pid namespace for its children can start no thread.)"""
    if kernels_apart:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        for signum in _STOP_SIGNALS:
            loop.add_signal_handler(signum, stop)
        return

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(_STOP_SIGNALS)
            if _from_inside(info.si_pid):
                log.warning("ignored signal %d from pid %d in the sandbox", info.si_signo,
                            info.si_pid)  # fmt: skip
                continue
            loop.call_soon_threadsafe(stop)
            return

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


async def serve(
    keys: list[Ed25519PublicKey],
    zygote: Zygote,
    *,
    workdir: str,
    host: str = "",
    port: int = 0,
    listen_fd: int | None = None,
    listen_path: str | None = None,
    stages: tuple[str, ...] = (),
    confine: bool = False,
    keep_caps: tuple[str, ...] = (),
    prepare: dict[str, Any] | None = None,
) -> None:
    """Run the agent until a stop signal from outside: on the inherited listening socket
    ``listen_fd`` if given, else on a Unix socket it makes at ``listen_path`` (a runtime
    that cannot hand one over: gVisor), else TCP on ``host:port``. Call with the stop
    signals blocked (:func:`block_stop_signals`), before any thread starts. ``prepare``
    (``{"connection": endpoint, "args": [...]}``) has a kernel prepared for the first
    start (:func:`_prepared_endpoint`)."""
    become_subreaper()
    with contextlib.suppress(OSError):
        os.makedirs(workdir, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="jupyter-sandbox-agent-"))
    base_env = {k: v for k, v in os.environ.items() if k != CONTROLLER_KEYS_ENV}
    agent = KernelAgent(keys, state_dir, workdir, zygote, base_env, stages=stages,
                        confine=confine, keep_caps=keep_caps,
                        socket_dir=listen_path and os.path.dirname(listen_path))  # fmt: skip
    if confine:
        # Built now, with what sealing imports: under gVisor a first import costs tens of
        # milliseconds, which the start that seals would wait for.
        from ..seccomp import build_filter
        from . import confine as _confine  # noqa: F401

        agent.kernel_filter = build_filter()
    zygote.on_exit = agent.kernel_exited
    zygote.listen(asyncio.get_running_loop())
    preparing = None
    endpoint = _prepared_endpoint(agent, prepare["connection"], host) if prepare else None
    if prepare and endpoint:
        preparing = asyncio.create_task(agent.prepare(endpoint, prepare["args"]))
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
        server = await asyncio.start_unix_server(agent.handle, sock=sock, limit=256 * 1024)
        where = f"inherited socket {sock.getsockname()}"
    elif listen_path is not None:
        server = await asyncio.start_unix_server(agent.handle, path=listen_path,
                                                 limit=256 * 1024)  # fmt: skip
        where = listen_path
    else:
        # Our own socket: asyncio would resolve a host name on an executor thread.
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        server = await asyncio.start_server(agent.handle, sock=sock, limit=256 * 1024)
        where = "{}:{}".format(*sock.getsockname()[:2])
    log.info("kernel agent listening on %s", where)
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()
    _watch_stop_signals(loop, stopped.cancel, zygote.own_namespace)
    try:
        async with server:
            while not stopped.done():
                agent._reap()
                await asyncio.wait([stopped], timeout=1.0)
    finally:
        if preparing is not None:
            preparing.cancel()
        with contextlib.suppress(Exception):
            await agent._stop(1.0)
        zygote.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def block_stop_signals() -> None:
    """Hold stop signals for the watcher thread (the zygote, forked later, unblocks)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
