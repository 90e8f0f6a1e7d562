"""The kernel process: forked, with ipykernel already imported.

The zygote (:mod:`.zygote`) imports ipykernel (and whatever else it was told
to preload) once, while the agent waits for a controller; each kernel start is
then a ``fork`` that only has to bind its sockets. :func:`run_kernel` is all
the child runs: it leaves behind everything of its parent (descriptors, signal
handlers and mask, the environment) before any user code can see it.

A pooled sandbox goes further: its first kernel is *prepared* at boot, before
anyone claims the sandbox. It initializes completely (sockets bound on the
member's endpoint, shell and history made, a throwaway message key) and then
waits, running nothing, for its *go*: the notebook's directory and variables
and the banner, sent by the agent over a pipe once the workspace is bound. Only
then does it take the real key (from its connection file), tell the agent it is
ready and start answering messages. Under gVisor, initializing is most of a
pooled start (0.16 s of 0.3 s); the go is a few milliseconds.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

log = logging.getLogger("jupyter-sandbox-agent")

#: What every agent preloads: the kernel itself.
KERNEL_MODULES = ("ipykernel.kernelapp",)
#: The argument that sets a kernel's banner (which says how it started); a prepared
#: kernel takes it with its go.
BANNER_ARG = "--InteractiveShell.banner2="
#: The argument that keeps a kernel's history in memory (its IPython directory is the
#: sandbox's private /tmp: see :func:`sandbox_provisioner.runtimes.history_arguments`).
HISTORY_ARG = "--HistoryManager.hist_file=:memory:"
#: Variables a kernel reads while it initializes (configuration, its parent, plotting):
#: a prepared kernel serves a start only if these are the same for it. The rest, such
#: as JupyterLab's JPY_SESSION_NAME or a locale, are applied with the go.
INIT_ENV = ("HOME", "IPYTHON*", "JUPYTER*", "JPY_*", "PYTHON*", "MPLBACKEND", "PYDEVD*",
            "DEBUGPY*", "SOURCE_DATE_EPOCH")  # fmt: skip
#: Exceptions: read at init and applied with the go by :func:`_go`, or read by this
#: project's code only, never while a kernel initializes.
_LATE_ENV = ("JPY_SESSION_NAME", "JUPYTER_SANDBOX_*")


def preload(modules: list[str]) -> list[str]:
    """Import ``modules`` (the kernel's own always); the names that failed, for the log."""
    failed = []
    for name in (*KERNEL_MODULES, *modules):
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional module must not stop the agent
            if name in KERNEL_MODULES:
                raise
            log.warning("preloading %s failed: %s", name, exc)
            failed.append(name)
    return failed


def learn_kernel_imports(timeout: float = 120.0) -> int:
    """Import what a starting kernel imports; the number of modules imported.

    ``IPKernelApp.initialize`` imports much more than ``ipykernel.kernelapp``
    (the shell, the debugger, comms: most of a kernel's start under gVisor).
    A throwaway child initializes a kernel on loopback ports and reports the
    modules it loaded; importing them here means every forked kernel has them.
    Must run before this process starts any thread (it forks).
    """
    import tempfile

    before = set(sys.modules)
    ready_r, ready_w = os.pipe()
    state = tempfile.mkdtemp(prefix="jupyter-sandbox-learn-")
    launch = KernelLaunch(
        connection_file=os.path.join(state, "kernel.json"),
        args=[],
        env=dict(os.environ),
        cwd=state,
        log_path=os.path.join(state, "kernel.log"),
    )
    ports = {f"{name}_port": 0 for name in ("shell", "iopub", "stdin", "hb", "control")}
    launch.write_connection_file({"transport": "tcp", "ip": "127.0.0.1", "key": "",
                                  "signature_scheme": "hmac-sha256", **ports})  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        code = 1
        try:
            from ipykernel.kernelapp import IPKernelApp

            with open(launch.log_path, "w") as log_file, contextlib.redirect_stdout(log_file):
                # A throwaway: no history database to write.
                IPKernelApp.instance().initialize(["-f", launch.connection_file, "--quiet",
                                                   HISTORY_ARG])  # fmt: skip
            new = [m for m in sys.modules if m not in before]
            os.write(ready_w, json.dumps(new).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(ready_r, 65536):
            data += chunk
    os.close(ready_r)
    os.waitpid(pid, 0)
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    try:
        names = json.loads(data or b"[]")
    except ValueError:
        names = []
    imported = 0
    for name in names:
        try:
            importlib.import_module(name)
            imported += 1
        except Exception:  # modules made at run time, or that only import in a kernel
            pass
    return imported


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel start: where its connection file is and what it gets."""

    connection_file: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    log_path: str

    def write_connection_file(self, info: dict[str, Any]) -> None:
        write_private_json(self.connection_file, info)


def write_private_json(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as JSON in ``path``, readable by its owner only (it holds keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)


def late_env(prepared: dict[str, str], wanted: dict[str, str]) -> dict[str, str] | None:
    """What a kernel prepared with the environment ``prepared`` must be given to have
    ``wanted``; None if that is more than a go can change (:data:`INIT_ENV`)."""
    import fnmatch

    if any(name not in wanted for name in prepared):
        return None
    changed = {k: v for k, v in wanted.items() if prepared.get(k) != v}
    for name in changed:
        late = any(fnmatch.fnmatchcase(name, p) for p in _LATE_ENV)
        if not late and any(fnmatch.fnmatchcase(name, p) for p in INIT_ENV):
            return None
    return changed


async def read_ready(fd: int, timeout: float) -> bytes:
    """The next byte a starting kernel writes to its ready pipe ``fd`` (b"P" prepared, b"R"
    ready); b"" when it exited first (it held the only writing end), also on timeout."""
    import asyncio

    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    os.set_blocking(fd, False)
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await asyncio.wait_for(readable, timeout)
        return os.read(fd, 1)
    except (TimeoutError, BlockingIOError):
        return b""
    finally:
        loop.remove_reader(fd)


def run_kernel(
    launch: KernelLaunch, ready_w: int, log_fd: int, go_r: int | None = None
) -> NoReturn:
    """Become the kernel (in a freshly forked child); writes b"R" to ``ready_w`` once its
    sockets are bound, and never returns. With ``go_r`` the kernel is prepared: it writes
    b"P" once initialized, then waits for its go on ``go_r`` (and exits if none comes)."""
    code = 1
    try:
        os.setsid()  # own process group: signals reach the kernel and its children only
        _detach(ready_w, log_fd, go_r)
        os.environ.clear()
        os.environ.update(launch.env)
        os.chdir(launch.cwd)
        from ipykernel.kernelapp import IPKernelApp

        argv = ["-f", launch.connection_file, *launch.args]
        sys.argv = [sys.executable, *argv]
        app = IPKernelApp.instance()
        app.initialize(argv)
        if go_r is not None:
            os.write(ready_w, b"P")
            go = _read_all(go_r)
            if not go:
                raise SystemExit(0)  # not wanted after all
            _go(app, json.loads(go))
        os.write(ready_w, b"R")
        os.close(ready_w)
        app.start()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc(file=sys.__stderr__)  # sys.stderr may be the kernel's iopub by now
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


def _go(app: Any, go: dict[str, Any]) -> None:
    """Make a prepared kernel the one a cold start would have made for this notebook:
    its key, directory (and what IPython recorded of the one it started in), variables
    and banner."""
    from pathlib import Path

    with open(app.connection_file) as f:
        app.session.key = json.load(f)["key"].encode()
    os.environ.update(go["env"])
    os.chdir(go["cwd"])
    shell = app.shell
    shell.starting_dir = os.getcwd()
    shell.history_manager.dir_hist[:] = [Path.cwd()]  # the list `_dh` is
    if os.environ.get("JPY_SESSION_NAME"):
        shell.user_ns["__session__"] = os.environ["JPY_SESSION_NAME"]
    if go.get("banner") is not None:
        shell.banner2 = go["banner"]


def _detach(ready_w: int, log_fd: int, go_r: int | None = None) -> None:
    """Leave the parent behind: its descriptors, signal handlers and signal mask."""
    gc.freeze()  # shared with the parent's pages, never written by the collector
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # Nothing of the parent's (its channel to the agent) reaches user code.
    keep = sorted({0, 1, 2, ready_w, *([] if go_r is None else [go_r])})
    for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
        os.closerange(low + 1, high)
