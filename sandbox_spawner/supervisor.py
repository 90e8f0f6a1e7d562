"""The supervisor of one user's server: its sandbox, and the only ways in and out of it.

``python -m sandbox_spawner.supervisor STATE_DIR`` reads ``STATE_DIR/plan.json``
(written by :class:`~sandbox_spawner.local.LocalSandboxSpawner`, mode 0600: it
holds the server's Hub token in the environment), starts the user's server in a
sandbox of this project's runtimes, and carries two byte streams:

* the proxy's: TCP on the host's loopback (the route the Hub gives the proxy)
  to the server's Unix socket in the sandbox's run directory. The server opens
  no TCP port; a sandbox without network reaches no host port, so no other
  user's code reaches this server, except through the proxy (and its login).
  The run directory is the user's: the supervisor connects only to the socket
  node there, never through a link the user's code put in its place.
* the server's to the Hub API: a Unix socket in the run directory
  (``http+unix`` in ``JUPYTERHUB_API_URL``) to the Hub's API port. It is the one
  host service the sandbox reaches; the proxy's API is not.

The hibernator asks the server whether it is in use at a port of its own (the plan's
``activity_port``), and freezes and thaws it through a socket in the state
directory (:mod:`.freezing`): the proxy's first byte for a frozen server thaws it.
Through the same socket it has a gVisor server hibernated with its memory
(:mod:`.hibernation`); the plan's ``resume`` restores one.

It is its own session, not a child the Hub waits for: a Hub restart leaves it
and the server running, and finds them again from the spawner's state. It ends
when the server does, or on SIGTERM (the spawner's stop): SIGTERM to the
server, a grace period, then every process of the sandbox is killed. It writes
the server's exit code to ``STATE_DIR/exit`` before it goes; a killed
supervisor takes the sandbox with it (its monitor has a parent-death signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sandbox_provisioner.runtimes import create_runtime
from sandbox_provisioner.spec import SandboxSpec

from . import freezing, hibernation
from .streams import Connections, forward_tcp_to_unix, forward_unix_to_tcp

log = logging.getLogger("jupyter-sandbox-supervisor")
PLAN, EXIT, LOG, LOCK = "plan.json", "exit", "supervisor.log", "supervisor.lock"


def holds(state_dir: Path) -> bool:
    """Whether a live supervisor runs from ``state_dir`` (it holds the lock there for as
    long as it runs): its directory must not be removed or reused."""
    try:
        fd = os.open(state_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def supervise(state_dir: Path) -> int:
    lock = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends: see holds()
    plan = json.loads((state_dir / PLAN).read_text())
    spec = SandboxSpec.from_dict(plan["spec"])
    freezer = freezing.Freezer()
    live = Connections()  # every connection carried: a hibernation closes them
    # All ready before the server starts (it calls the Hub at once).
    proxy_side = await forward_tcp_to_unix(plan["port"], plan["server_socket"],
                                           own_socket=True, gate=freezer.traffic, live=live)
    servers = [proxy_side,
               await forward_unix_to_tcp(plan["hub_socket"], *plan["hub_api"], live=live)]
    if plan.get("activity_port"):
        servers.append(await forward_tcp_to_unix(
            plan["activity_port"], plan["server_socket"], own_socket=True, gate=freezer.awake,
            live=live,
        ))  # fmt: skip
    runtime = create_runtime(plan["runtime"])
    sleeper = hibernation.Hibernation(plan, runtime, live, freezer)
    sandbox = await _resume(runtime, plan, state_dir, sleeper) if plan.get("resume") else None
    if sandbox is None and plan.get("restore_from"):  # a template: restored, told to go on
        sandbox = await runtime.restore(spec, Path(plan["restore_from"]))  # type: ignore[attr-defined]
        (state_dir / "ctl" / "go").touch()
    elif sandbox is None:
        sandbox = await runtime.launch(spec)
    freezer.sandbox = sandbox
    freezer.on_hibernate = sleeper.run
    servers.append(await freezing.serve(str(state_dir / freezing.SOCKET), freezer))
    log.info("server of %s started (%s sandbox, monitor pid %s)", plan["name"],
             plan["runtime"], getattr(sandbox, "pid", "?"))  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    waiting = asyncio.ensure_future(sandbox.wait())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if sleeper.checkpointing:  # its image is being kept, then the hibernator told
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sleeper.done.wait(), 600)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(freezer.hibernation_answered.wait(), 5)
    freezer.stop()  # no freeze from now on; a frozen server takes no signal
    if not waiting.done():
        log.info("stopping the server of %s", plan["name"])
        await sandbox.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), float(plan.get("stop_grace", 5)))
    stopping.cancel()
    await sandbox.cleanup()  # every process of the sandbox, its cgroups, its state
    code = await sandbox.poll()
    for server in servers:
        server.close()
    with contextlib.suppress(OSError):  # whatever the user's code put there: not ours
        os.unlink(plan["hub_socket"])
    with contextlib.suppress(OSError):
        os.unlink(state_dir / freezing.SOCKET)
    (state_dir / EXIT).write_text(str(code if code is not None else -signal.SIGKILL))
    log.info("server of %s ended with %s", plan["name"], code)
    return 0


async def _resume(runtime: Any, plan: dict[str, Any], state_dir: Path,
                  sleeper: hibernation.Hibernation) -> Any:
    """The hibernated server restored, or None (then it starts cold); what happened is
    written to ``RESUMED`` for the spawner (whose spawn page tells the user)."""
    try:
        sandbox, lost = await hibernation.restore(runtime, plan)
        outcome: dict[str, Any] = {"restored": True, "lost_kernels": lost}
        sleeper.spec = plan["resume"]["spec"]
    except Exception as exc:
        log.warning("the hibernated server of %s was not restored: %s", plan["name"], exc)
        sandbox, outcome = None, {"restored": False, "reason": str(exc)[-300:]}
    fd = os.open(state_dir / hibernation.RESUMED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(outcome, f)
    return sandbox


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m sandbox_spawner.supervisor STATE_DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(message)s")
    sys.exit(asyncio.run(supervise(Path(args[0]))))


if __name__ == "__main__":
    main()
