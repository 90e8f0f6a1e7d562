"""The kernel factory: a process that imported the kernel and was never told a secret.

Kernels are forks, so that a start only binds sockets. Forked from the agent,
a kernel would carry a copy of the agent's memory, its session key included
(walking asyncio's tasks finds it), and could then drive its own agent. So the
agent forks the *zygote* first, at boot, before it has anything to hide; the
zygote gives up what a kernel must not have (the agent's descriptors,
capabilities beyond the kernel's; in a pooled sandbox it loads the kernel's
seccomp filter), makes itself non-dumpable (no kernel reads or writes its
memory), imports ipykernel and what a kernel imports while starting, says it
is ready, and from then on only forks kernels when the agent asks.

Where the agent may (a pooled sandbox), the zygote is the first process of a
pid namespace of its own, and kernels are its children there: a kernel cannot
end the zygote (signals to a namespace's init from inside it are dropped) and
cannot name the agent at all (it has no pid in the kernel's namespace). The
zygote reaps what dies in its namespace and tells the agent of its kernels'
exits.

The agent talks to the zygote over a socketpair of JSON messages: a start
(connection file, arguments, environment, directory) comes with two
descriptors (the kernel's log and the pipe it reports readiness on), and a
third for a prepared kernel (the pipe its go comes on: :mod:`.kernel`); it is
answered with the kernel's pid in the zygote's namespace; ``exited`` notices
follow as kernels end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import kernel as kernel_process

log = logging.getLogger("jupyter-sandbox-agent")
_PR_SET_DUMPABLE = 4
_CLONE_NEWPID = 0x20000000
_MAX_MESSAGE = 1 << 20
#: Seconds for the zygote to import the kernel, and to fork one.
READY_TIMEOUT, FORK_TIMEOUT = 300.0, 30.0

_libc = ctypes.CDLL(None, use_errno=True)


def set_dumpable(dumpable: bool) -> None:
    """Non-dumpable: only CAP_SYS_PTRACE (which no kernel has) opens /proc/PID/mem."""
    _libc.prctl(_PR_SET_DUMPABLE, int(dumpable), 0, 0, 0)


class ZygoteDied(RuntimeError):
    """The kernel factory is gone; this sandbox cannot start another kernel."""


class Zygote:
    """The agent's handle on its zygote; ``on_exit(pid, code)`` hears of kernels' exits
    (pids in the agent's own namespace)."""

    def __init__(self, pid: int, sock: socket.socket, own_namespace: bool):
        self.pid, self.sock, self.own_namespace = pid, sock, own_namespace
        self.alive = True
        self.on_exit: Callable[[int, int], None] = lambda pid, code: None
        self._replies: asyncio.Queue[dict[str, Any]] | None = None
        self._inner: dict[int, int] = {}  # a kernel's pid in the zygote's namespace -> ours

    @classmethod
    def fork(
        cls,
        prepare: Callable[[], None],
        preload: list[str],
        close_fds: list[int],
        own_namespace: bool = False,
        become: Callable[[], None] | None = None,
    ) -> Zygote:
        """Fork the zygote (first in a pid namespace of its own with ``own_namespace``,
        where the capabilities allow); returns once it has imported the kernel.
        ``prepare`` runs in the zygote before it imports anything, ``become`` in each
        kernel it forks, first."""
        if own_namespace and _libc.unshare(_CLONE_NEWPID) != 0:
            log.warning("kernels share the agent's pid namespace: %s",
                        os.strerror(ctypes.get_errno()))  # fmt: skip
            own_namespace = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            ours.close()
            for fd in close_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            _serve(theirs, prepare, preload, become)
        theirs.close()
        zygote = cls(pid, ours, own_namespace)
        ours.settimeout(READY_TIMEOUT)
        try:
            ready = zygote._decode(ours.recv(_MAX_MESSAGE))
        except OSError as exc:
            raise ZygoteDied(f"the kernel factory did not start: {exc}") from None
        if ready.get("ready") is not True:
            raise ZygoteDied(f"the kernel factory did not start: {ready.get('error', ready)}")
        log.info("kernel factory ready (pid %d, %s modules preloaded)", pid, ready.get("learned"))
        return zygote

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the zygote's messages on ``loop`` from now on."""
        self.sock.setblocking(False)
        self._replies = asyncio.Queue()
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            if self._replies is not None:
                self._replies.put_nowait({"error": "the kernel factory has exited"})
            return
        message = json.loads(data)
        if "exited" in message:
            inner = int(message["exited"])
            outer = self._inner.pop(inner, inner)
            self.on_exit(outer, int(message["code"]))
        elif self._replies is not None:
            self._replies.put_nowait(message)

    async def start(
        self, launch: dict[str, Any], ready_w: int, log_fd: int, go_r: int | None = None
    ) -> int:
        """Fork a kernel for ``launch`` (KernelLaunch fields), a prepared one with ``go_r``;
        its pid (in our namespace)."""
        if not self.alive or self._replies is None:
            raise ZygoteDied("the sandbox's kernel factory has exited")
        fds = [ready_w, log_fd, *([] if go_r is None else [go_r])]
        try:
            socket.send_fds(self.sock, [json.dumps(launch).encode()], fds)
            reply = await asyncio.wait_for(self._replies.get(), FORK_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.close()  # a stopped or half-dead zygote: never trusted again
            raise ZygoteDied(f"the sandbox's kernel factory is gone: {exc}") from None
        if "pid" not in reply:
            if not self.alive:
                raise ZygoteDied(str(reply.get("error")))
            raise OSError(f"cannot fork the kernel: {reply.get('error', reply)}")
        inner = int(reply["pid"])
        outer = self._outer_pid(inner) if self.own_namespace else inner
        self._inner[inner] = outer
        return outer

    async def start_kernel(
        self, launch: kernel_process.KernelLaunch, go_r: int | None = None
    ) -> tuple[int, int]:
        """Fork a kernel for ``launch`` writing to ``launch.log_path`` (a prepared one with
        ``go_r``): its pid and the pipe it says it is ready on (the caller closes it)."""
        ready_r, ready_w = os.pipe()
        log_fd = os.open(launch.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        request = {"connection_file": launch.connection_file, "args": launch.args,
                   "env": launch.env, "cwd": launch.cwd}  # fmt: skip
        try:
            pid = await self.start(request, ready_w, log_fd, go_r)
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
            os.close(log_fd)
        return pid, ready_r

    def _outer_pid(self, inner: int) -> int:
        """Our pid of the zygote's child that is ``inner`` in the zygote's namespace.

        Without NSpid in /proc (gVisor), the zygote's one child not known yet: it forks
        one kernel at a time, and nothing else."""
        unknown = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("PPid", -1)) != self.pid:
                continue
            nspid = fields.get("NSpid", "").split()
            if nspid and int(nspid[-1]) == inner:
                return int(entry.name)
            if not nspid and int(entry.name) not in self._inner.values():
                unknown.append(int(entry.name))
        if len(unknown) == 1:
            return unknown[0]
        raise OSError(f"the kernel (pid {inner} of its namespace) is gone")

    def _decode(self, data: bytes) -> dict[str, Any]:
        if not data:
            self.alive = False
            raise ZygoteDied("the sandbox's kernel factory has exited")
        return json.loads(data)

    def close(self) -> None:
        if self.alive:
            self.alive = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


def _serve(
    sock: socket.socket,
    prepare: Callable[[], None],
    preload: list[str],
    become: Callable[[], None] | None,
) -> NoReturn:
    code = 0
    try:
        set_dumpable(False)
        # As a namespace's init, only signals it handles reach it from inside: none.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        prepare()
        kernel_process.preload(preload)
        learned = kernel_process.learn_kernel_imports()
        sock.send(json.dumps({"ready": True, "learned": learned}).encode())
        _loop(sock, become)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        code = 1
    os._exit(code)


def _loop(sock: socket.socket, become: Callable[[], None] | None) -> None:
    """Fork kernels on request; reap whatever ends here and report the kernels. SIGCHLD
    wakes the loop through a pipe (a handler that does nothing else)."""
    kernels: set[int] = set()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [], 5.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        if sock in readable:
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
            except OSError:
                return
            if not data:
                return  # the agent has gone
            try:
                pid = _fork_kernel(json.loads(data), fds, become)
                kernels.add(pid)
                reply: dict[str, Any] = {"pid": pid}
            except Exception as exc:  # a bad request or a failed fork: tell the agent
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(json.dumps(reply).encode())
        _reap(sock, kernels)


def _reap(sock: socket.socket, kernels: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in kernels:
            kernels.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            sock.send(json.dumps({"exited": pid, "code": code}).encode())


def _fork_kernel(
    request: dict[str, Any], fds: list[int], become: Callable[[], None] | None = None
) -> int:
    if len(fds) not in (2, 3):
        raise ValueError("a start needs the ready pipe and the log (and a go pipe)")
    ready_w, log_fd, *go = fds
    launch = kernel_process.KernelLaunch(
        connection_file=str(request["connection_file"]),
        args=[str(a) for a in request["args"]],
        env={str(k): str(v) for k, v in request["env"].items()},
        cwd=str(request["cwd"]),
        log_path="",
    )
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the kernel
        if become is not None:
            try:
                become()
            except BaseException:
                os._exit(1)  # never a kernel with the zygote's privileges
        set_dumpable(True)  # its own /proc files are its own again
        kernel_process.run_kernel(launch, ready_w, log_fd, *go)
    return pid
