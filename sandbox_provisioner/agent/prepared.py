"""A pooled sandbox's first kernel, initialized before anyone claims the sandbox.

A kernel's start in a warm sandbox was mostly ``IPKernelApp.initialize``
(binding sockets, making the shell and its history): under gVisor 0.16 s of a
0.3 s start. None of it depends on the notebook, since a member's endpoint is
its own (an IPC path in its directory, :func:`sandbox_provisioner.pool.kernel_endpoint`)
and the message key can change until the first message. So at boot the agent
has its zygote fork a kernel that initializes with a throwaway key and waits
(:func:`.kernel.run_kernel`); the start that claims it writes the connection
file with the real key, then sends the *go*: the notebook's directory, the
variables it adds and the banner.

A start uses the prepared kernel only when it asks for what the kernel was
prepared with: the same arguments (the banner aside), the same endpoint and an
environment that differs only in variables a kernel reads after initializing
(:func:`.kernel.late_env`). Any other start, and every restart in place, forks
a kernel as before; the prepared one is ended.

The prepared kernel runs none of the notebook's code before its go, and the go
comes after the workspace is bound and the sandbox sealed: what user code finds
is what a freshly forked kernel finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from typing import Any

from .kernel import BANNER_ARG, KernelLaunch, late_env, read_ready
from .zygote import Zygote


@dataclass
class PreparedKernel:
    """A kernel waiting for its go: its pid (the agent's namespace), the pipe it says it is
    ready on, the pipe its go goes down, and what it was prepared with."""

    pid: int
    ready_r: int
    go_w: int
    args: list[str]
    env: dict[str, str]
    endpoint: dict[str, Any]
    alive: bool = True

    @classmethod
    async def fork(cls, zygote: Zygote, launch: KernelLaunch,
                   endpoint: dict[str, Any]) -> PreparedKernel:  # fmt: skip
        """Have ``zygote`` fork a kernel for ``launch`` that waits for its go."""
        go_r, go_w = os.pipe()
        try:
            pid, ready_r = await zygote.start_kernel(launch, go_r)
        except BaseException:
            os.close(go_w)
            raise
        finally:
            os.close(go_r)
        return cls(pid, ready_r, go_w, list(launch.args), dict(launch.env), dict(endpoint))

    def go_for(
        self, args: list[str], env: dict[str, str], endpoint: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The go that makes this kernel the one a start asks for; None if it cannot be."""
        if not self.alive or endpoint != self.endpoint:
            return None
        if [a for a in args if not a.startswith(BANNER_ARG)] != self.args:
            return None
        late = late_env(self.env, env)
        if late is None:
            return None
        banners = [a.removeprefix(BANNER_ARG) for a in args if a.startswith(BANNER_ARG)]
        return {"env": late, "banner": banners[-1] if banners else None}

    async def initialized(self, timeout: float) -> bool:
        """Wait for the kernel to say it has initialized (b"P"); False if it ended first."""
        return self.alive and await read_ready(self.ready_r, timeout) == b"P"

    def go(self, go: dict[str, Any], cwd: str) -> int:
        """Send the go (the connection file has the real key by now); the ready pipe, which
        the caller reads, then closes."""
        data = json.dumps({**go, "cwd": cwd}).encode()
        # Blocking: a go is a few KiB, and the pipe holds 64 KiB while the kernel initializes.
        view = memoryview(data)
        while view:
            view = view[os.write(self.go_w, view) :]
        os.close(self.go_w)
        self.go_w = -1
        return self.ready_r

    def discard(self) -> None:
        """End the kernel (it never ran user code) and drop its pipes."""
        if self.alive:  # its group, or itself if it has not made its group yet
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(self.pid, signal.SIGKILL)
        for fd in (self.go_w, self.ready_r):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.go_w = self.ready_r = -1
        self.alive = False
