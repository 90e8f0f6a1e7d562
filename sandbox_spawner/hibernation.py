"""Hibernation that keeps the session: a gVisor server saved to disk, restored on the next visit.

KEP-694's ``Hibernate`` strategy on one machine. The hibernator (:mod:`.hibernator`)
asks an idle server's supervisor to hibernate it (``{"do": "hibernate"}`` on its
control socket, :mod:`.freezing`), then stops it through the Hub as it would any idle
server. The supervisor (:class:`Hibernation`):

1. stops carrying the proxy's traffic (a request now is refused, as for any stopped
   server), thaws the server if it was frozen;
2. asks the server to stop listening (:mod:`.quiesce`) and closes its own ends of
   every connection it carried: a sandbox holding a socket of the host's cannot be
   checkpointed;
3. checkpoints the whole sandbox (``runsc checkpoint``: the server, its kernels and
   terminals, their memory; the sandbox then ends) into a directory of its own, then
   renames it into place with its record. An image larger than the limit is removed.

Anything that fails before the sandbox ends leaves the server running as it was (it
listens again); anything after leaves it stopped with the user's files, as a stop
would. Never half-gone.

The next start of that server (:class:`~.local.LocalSandboxSpawner`) finds the image,
checks its record (the same user, account uid, and the very sandbox this start would
make: mounts and their sources, identity, limits, environment), and has the
supervisor restore it (``runsc restore``), with the server's Hub token and activity key
of the start that made it (JupyterHub keeps a server's token when its spawner
``will_resume``). The restored server listens again on a signal; its kernels come back
with their variables. A restore that fails ends in a cold start, and the spawn page says
the kernels were restarted. The image is removed once used, or tried.

Images are secrets: the server's memory, its token. They are root's (directories 0700,
files 0600, below a root-only directory), named by the Hub's instance and the server's
key, read only by root, restored only into the same account's sandbox, removed with the
user, and replaced by a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from sandbox_provisioner.identity import SandboxIdentity
from sandbox_provisioner.runtimes.base import Sandbox

from . import remove_aside
from .activity import HEADER, KEY_ENV
from .quiesce import DRAIN_TIMEOUT, RESUME_SIGNAL
from .quiesce import PATH as QUIESCE_PATH
from .streams import Connections, open_own_unix_connection

log = logging.getLogger("jupyter-sandbox-supervisor")
#: In an image's directory: the record (what it is of, for whom) and runsc's files.
RECORD, FILES = "record.json", "image"
#: In the server's state directory: what the restored sandbox wrote, and how its restore
#: went (``{"restored": bool, "lost_kernels"|"reason"}``, the supervisor's, for the spawner).
RESTORE_LOG, RESUMED = "restored.log", "resumed.json"
MAX_RECORD = 1 << 20
#: Seconds the server has to stop listening, and to listen again after a restore.
QUIESCE_TIMEOUT, RELISTEN_TIMEOUT = 10.0, 30.0
#: Seconds a restored server runs before its kernels are counted.
SETTLE = 0.5


class HibernationFailed(RuntimeError):
    """No image was kept; the message says why."""


# -- the images of one Hub (root's) ------------------------------------------------------
def read_record(directory: Path) -> dict[str, Any] | None:
    """An image's record, if it is a complete one (root wrote it; read with a bound, and
    never through a link all the same)."""
    try:
        fd = os.open(directory / RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECORD + 1)
    if len(data) > MAX_RECORD:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def usable(record: dict[str, Any] | None, expected: dict[str, Any]) -> str | None:
    """Why the image of ``record`` may not be restored for a start that ``expected``
    describes (the Hub, the user, their account's uid); None if it may."""
    if record is None:
        return "its record is missing or unreadable"
    for key, value in expected.items():
        if record.get(key) != value:
            return f"its {key} differs (the server's configuration changed?)"
    if not isinstance(record.get("spec"), dict) or not isinstance(record.get("pid"), int):
        return "its record is incomplete"
    return None


def _private(directory: Path) -> None:
    """Everything below ``directory`` (root's, in a root-only directory) root's alone:
    runsc writes its image with the supervisor's umask."""
    for parent, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o700, follow_symlinks=False)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o600, follow_symlinks=False)


def disk_usage(directory: Path) -> int:
    """Bytes the files below ``directory`` take on disk (runsc's image: no links)."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


# -- the server's side of it, from the supervisor ----------------------------------------
async def ask_server(server_socket: str, method: str, prefix: str, key: str,
                     live: Connections | None = None) -> dict[str, Any]:  # fmt: skip
    """The server's :mod:`.quiesce` endpoint, asked at its own socket with its activity
    key; its JSON answer. ``live``: connections to close once the request is sent (the
    server waits for them before it answers a POST)."""
    return await asyncio.wait_for(_ask(server_socket, method, prefix, key, live),
                                  QUIESCE_TIMEOUT + DRAIN_TIMEOUT)  # the whole exchange


async def _ask(server_socket: str, method: str, prefix: str, key: str,
               live: Connections | None) -> dict[str, Any]:  # fmt: skip
    reader, writer = await open_own_unix_connection(server_socket)
    try:
        writer.write(f"{method} {prefix.rstrip('/')}/{QUIESCE_PATH} HTTP/1.1\r\nHost: localhost\r\n"
                     f"{HEADER}: {key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                     .encode())  # fmt: skip
        await writer.drain()
        if live is not None:
            await asyncio.sleep(0.05)  # the server closes its listening socket first
            live.close_all()
        answer = b""
        while len(answer) < 8192 and (chunk := await reader.read(8192)):
            answer += chunk
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise HibernationFailed(f"the server answered {status[:80].decode(errors='replace')!r}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # the server's to make: nested 8000 deep, say
        raise HibernationFailed("the server's answer is not JSON") from None
    if not isinstance(data, dict):
        raise HibernationFailed("the server's answer is not a JSON object")
    return data


async def ask_to_quiesce(server_socket: str, prefix: str, key: str,
                         live: Connections) -> int:  # fmt: skip
    """Ask the server to stop listening, close every connection in ``live`` (which the
    server waits for); its process id (inside)."""
    pid = (await ask_server(server_socket, "POST", prefix, key, live)).get("pid")
    if type(pid) is not int or pid <= 0:
        raise HibernationFailed(f"the server's answer has no process id: {pid!r}")
    return pid


async def wait_listening(server_socket: str, timeout: float, sandbox: Any = None) -> bool:
    """Whether the server's socket came to accept connections within ``timeout`` seconds
    (and before ``sandbox`` ended)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            _, writer = await open_own_unix_connection(server_socket)
            writer.close()
            return True
        if time.monotonic() > deadline or (sandbox is not None and await sandbox.poll()
                                           is not None):  # fmt: skip
            return False
        await asyncio.sleep(0.05)


class Hibernation:
    """One supervisor's server, hibernated on request (see the module's text)."""

    def __init__(self, plan: dict[str, Any], runtime: Any, live: Connections, freezer: Any):
        self.plan = plan
        self.runtime = runtime
        self.live = live
        #: Its gates refuse the proxy's traffic while ``freezer.closed``.
        self.freezer = freezer
        #: The spec the sandbox runs (a restored server's, or the cold start's).
        self.spec: dict[str, Any] = plan["spec"]
        #: Set while the sandbox is being checkpointed (it ends meanwhile), and once it
        #: ended for a hibernation (its image kept, or not).
        self.checkpointing = self.ended = False
        self.done = asyncio.Event()
        self.answered = asyncio.Event()

    def refusal(self) -> str | None:
        """Why this server cannot hibernate with its memory, if it cannot."""
        if self.plan.get("runtime") != "gvisor":
            return f"a {self.plan.get('runtime')} server cannot keep its memory (gVisor only)"
        if not self.plan.get("image"):
            return "the spawner gave no place for its image"
        return None

    async def run(self, sandbox: Sandbox) -> dict[str, Any]:
        """Hibernate ``sandbox``; the answer for the hibernator."""
        try:
            return await self._run(sandbox)
        finally:
            self.done.set()

    async def _run(self, sandbox: Sandbox) -> dict[str, Any]:
        refused = self.refusal()
        if refused:
            return {"ok": False, "reason": refused, "ended": False}
        image = self.plan["image"]
        final = Path(image["dir"])
        limit = int(image["limit"])
        began = time.monotonic()
        try:
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            free = shutil.disk_usage(final.parent).free
            if free < limit:
                raise HibernationFailed(f"{free >> 20} MiB free for images, less than the "
                                        f"limit of one ({limit >> 20} MiB)")  # fmt: skip
        except OSError as exc:
            return {"ok": False, "reason": f"no place for the image: {exc}", "ended": False}
        except HibernationFailed as exc:
            return {"ok": False, "reason": str(exc), "ended": False}
        self._close()
        env = self.spec.get("env") or {}
        try:
            pid = await ask_to_quiesce(self.plan["server_socket"],
                                       env.get("JUPYTERHUB_SERVICE_PREFIX", "/"),
                                       env.get(KEY_ENV, ""), self.live)  # fmt: skip
        except Exception as exc:  # whatever the server answered, or did not: it runs on
            self._open()
            return {"ok": False, "reason": f"the server did not let go: {exc!r}"[:300],
                    "ended": False}  # fmt: skip
        staging = final.with_name(f".new-{final.name}-{secrets.token_hex(4)}")
        self.checkpointing = True  # the sandbox ends now, one way or the other
        try:
            staging.mkdir(mode=0o700)
            await self._checkpoint(sandbox, staging / FILES)
        except (OSError, RuntimeError) as exc:
            await remove_aside(staging)
            if await sandbox.poll() is not None:  # a failed checkpoint can end the sandbox
                self.ended = True
                return {"ok": False, "ended": True, "reason": f"{str(exc)[:300]}: stopped"}
            self.checkpointing = False
            await self._resume(sandbox, pid)
            return {"ok": False, "reason": str(exc)[:300], "ended": False}
        self.ended = True  # the sandbox is gone: the server is stopped, image or not
        _private(staging)
        size = disk_usage(staging)
        if size > limit:
            await remove_aside(staging)
            return {"ok": False, "ended": True, "reason": f"its image took {size >> 20} MiB, "
                    f"more than the limit ({limit >> 20} MiB): stopped instead"}  # fmt: skip
        record = {**image["record"], "spec": self.spec, "pid": pid, "bytes": size,
                  "made": datetime.datetime.now(datetime.UTC).isoformat()}  # fmt: skip
        try:
            fd = os.open(staging / RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            await remove_aside(final)  # an older image of this server
            os.rename(staging, final)
        except OSError as exc:
            await remove_aside(staging)
            return {"ok": False, "ended": True, "reason": f"its image was not kept: {exc}"}
        took = time.monotonic() - began
        log.info("hibernated the server: %d MiB image in %.2fs", size >> 20, took)
        return {"ok": True, "ended": True, "bytes": size, "seconds": round(took, 3)}

    def _close(self) -> None:
        """No traffic reaches the server, and it is thawed and frozen no more."""
        self.freezer.closed = True
        self.freezer.stop()

    def _open(self) -> None:
        self.freezer.closed = False
        self.freezer.stopping = False

    async def _checkpoint(self, sandbox: Sandbox, files: Path) -> None:
        """runsc checkpoint, tried again while the sandbox still lets go of the host's
        sockets (closing them inside takes the server a moment)."""
        for attempt in range(3):
            try:
                await self.runtime.checkpoint(sandbox, files)
                return
            except RuntimeError:
                if attempt == 2 or await sandbox.poll() is not None:
                    raise
                shutil.rmtree(files, ignore_errors=True)
                await asyncio.sleep(0.5)

    async def _resume(self, sandbox: Sandbox, pid: int) -> None:
        """The checkpoint failed: the server goes on as it was, listening again."""
        with contextlib.suppress(Exception):
            await sandbox.signal_process(pid, int(RESUME_SIGNAL))  # type: ignore[attr-defined]
        await wait_listening(self.plan["server_socket"], RELISTEN_TIMEOUT)
        self._open()
        log.warning("the server was not hibernated; it runs on")


async def _signal_when_running(sandbox: Any, pid: int) -> None:
    """The resume signal to ``pid``, once runsc has the restored container (its restore
    is under way when ``runtime.restore`` returns)."""
    deadline = time.monotonic() + RELISTEN_TIMEOUT
    while True:
        try:
            await sandbox.signal_process(pid, int(RESUME_SIGNAL))
            return
        except RuntimeError:
            if time.monotonic() > deadline or await sandbox.poll() is not None:
                raise
            await asyncio.sleep(0.05)


async def restore(runtime: Any, plan: dict[str, Any]) -> tuple[Sandbox, int]:
    """The server of ``plan["resume"]`` restored from its image and listening again, and
    how many of its kernels did not survive the restore (runsc 20240729 loses a process
    now and then: a thread that faults as it runs again); raises, its sandbox ended, if
    the server itself does not run again."""
    from sandbox_provisioner.spec import SandboxSpec

    resume = plan["resume"]
    spec = SandboxSpec.from_dict(resume["spec"])
    # Its own output, kept apart: a restore that fails leaves it for the log, and the cold
    # start that follows writes the server's.
    spec = dataclasses.replace(spec, log_path=spec.log_path.with_name(RESTORE_LOG))
    sandbox = await runtime.restore(spec, Path(resume["dir"]) / FILES)
    try:
        await _signal_when_running(sandbox, resume["pid"])
        if not await wait_listening(plan["server_socket"], RELISTEN_TIMEOUT, sandbox):
            code = await sandbox.poll()
            raise HibernationFailed("the restored server did not listen again" +
                                    (f" (it ended with {code})" if code is not None else ""))
        await asyncio.sleep(SETTLE)  # a lost process faults as soon as it runs again
        check = await ask_server(plan["server_socket"], "GET",
                                 spec.env.get("JUPYTERHUB_SERVICE_PREFIX", "/"),
                                 spec.env.get(KEY_ENV, ""))  # fmt: skip
    except BaseException:
        await sandbox.cleanup()
        raise
    lost = len(check.get("lost") or [])
    log.info("restored the server%s", f"; {lost} kernel(s) lost" if lost else "")
    return sandbox, lost


# -- the spawner's side ------------------------------------------------------------------
class KeepsMemory:
    """Mixin for :class:`~.local.LocalSandboxSpawner`: where its server's image is, and
    what a start makes of one (needs its ``instance``, ``_state_dir``, ``_event``,
    ``hibernation_images`` and ``hibernation_image_limit``)."""

    def _image_dir(self) -> Path:
        """Where the server's hibernation image is kept: this Hub's, this server's."""
        return Path(self.hibernation_images) / self.instance.id / self._state_dir().name

    def _image_record(self, who: SandboxIdentity) -> dict[str, Any]:
        """What an image of this server must say of itself to be restored into it."""
        return {"hub": self.instance.id, "user": self.user.name, "user_id": int(self.user.id),
                "server": self.name, "uid": who.uid, "runtime": "gvisor"}  # fmt: skip

    def _image_limit(self) -> int:
        return self.hibernation_image_limit or int(self.mem_limit or 0) or 4 << 30

    async def _hibernated(self, image: Path, kept: dict[str, Any]) -> dict[str, Any] | None:
        """The record of this server's hibernation image, if it may be restored: then the
        server's Hub token and activity key are the image's own again (JupyterHub kept the
        token: ``will_resume``), for the restore and for a cold start alike."""
        for directory in (Path(self.hibernation_images), image.parent):
            directory.mkdir(mode=0o700, exist_ok=True)  # root's alone, whatever the umask
        if not image.is_dir():
            return None
        record = read_record(image)
        why = usable(record, kept)
        env = ((record or {}).get("spec") or {}).get("env") or {}
        token, key = env.get("JUPYTERHUB_API_TOKEN"), env.get(KEY_ENV)
        if why is None and not (isinstance(token, str) and token and isinstance(key, str)):
            why = "its record has no token"
        if why is not None:
            self.log.warning("%s: the hibernation image %s is not restored: %s",
                             self._log_name, image, why)  # fmt: skip
            self._event(20, "Your server's hibernated memory cannot be restored: it starts "
                        "afresh with your files, and your kernels were restarted")  # fmt: skip
            await remove_aside(image)
            return None
        self.api_token, self.activity_key = token, key
        return record

    async def _same_sandbox(self, record: dict[str, Any], spec: Any, image: Path) -> bool:
        """Whether the image's server ran in the sandbox this start would make (its mounts
        and their sources, identity, limits, environment): a restore brings back the old
        one whole, so what an administrator changed since (a profile's mount, a group's
        limits) would come back with it. If not, the image goes and the user is told."""
        def comparable(data: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in data.items() if k != "switches_user"}  # template or not

        if comparable(record["spec"]) == comparable(spec.to_dict()):
            return True
        changed = sorted(k for k in set(record["spec"]) | set(spec.to_dict())
                         if record["spec"].get(k) != spec.to_dict().get(k))  # fmt: skip
        self.log.warning("%s: the hibernation image %s is not restored: the server's sandbox "
                         "changed since (%s)", self._log_name, image, ", ".join(changed))
        self._event(20, "Your server's hibernated memory cannot be restored (its sandbox's "
                    "configuration changed): it starts afresh with your files, and your "
                    "kernels were restarted")  # fmt: skip
        await remove_aside(image)
        return False

    async def _restored(self, state: Path, image: Path) -> bool:
        """Whether the supervisor restored the image (else the server started cold, and
        the user is told); the image is removed either way: it was used, or tried."""
        said = state / RESUMED
        deadline = time.monotonic() + 30  # written once the server listens: a moment
        while not said.exists() and time.monotonic() < deadline and await self.poll() is None:
            await asyncio.sleep(0.02)
        try:
            outcome = json.loads(said.read_text())
        except (OSError, ValueError):
            outcome = {"restored": False, "reason": "the supervisor said nothing"}
        await remove_aside(image)
        if outcome.get("restored") is True:
            lost = outcome.get("lost_kernels")
            if isinstance(lost, int) and lost > 0:
                self.log.warning("%s: restored with %d kernel(s) lost", self._log_name, lost)
                self._event(90, f"{lost} of your kernels did not survive the restore and "
                            "were restarted; the others kept their variables")  # fmt: skip
            return True
        self.log.warning("%s: not restored from its hibernation image: %s", self._log_name,
                         outcome.get("reason"))  # fmt: skip
        self._event(90, "Your server could not be restored as it was when it hibernated: it "
                    "started afresh with your files, and your kernels were restarted")  # fmt: skip
        return False
