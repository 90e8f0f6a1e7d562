"""A child process of the service or the Hub, bounded in time, that ends with its caller.

git's fetches and a launch's copy into a home run as children: their work is the
repository's to make long, so they run off the event loop, and a launch that goes away
(the page closed, the start cancelled) or runs out of time takes its child with it.
"""

from __future__ import annotations

import asyncio
import contextlib


async def run(argv: list[str], *, env: dict[str, str], cwd: str,
              timeout: float) -> tuple[int, bytes, bytes]:  # fmt: skip
    """``argv``'s exit code, output and errors; TimeoutError once ``timeout`` has passed,
    and the child is ended then, as when the caller is cancelled."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(BaseException):
            await proc.wait()
        raise
    return proc.returncode or 0, out, err


def last_line(err: bytes, code: int) -> str:
    """What a failed child said last (its exit code if nothing)."""
    lines = err.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit code {code}"
