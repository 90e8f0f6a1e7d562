"""The isolation and escape suites again, with the server as an unprivileged user.

CI runs as root, where kernels run as the sandbox uid. A server run by an
ordinary user takes the other path (kernels as that user, in unprivileged user
namespaces; binds by descriptor; rlimits): this runs the bubblewrap tests of
``test_isolation.py`` and ``test_escapes.py`` as such a user, in a pytest of its
own. gVisor needs root and is not part of it.

The user is made when missing. Its pytest reaches this checkout and its virtual
environment at their own paths: a directory on the way that the user may not
cross (a checkout under /root) is replaced, in a mount namespace of the run's
own, by a traversable one holding just the next step (:func:`expose`).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox_provisioner.runtimes.mount_stage import StageError, attach, clone

USER = "jupyter-sandbox-test"
CHECKOUT = Path(__file__).resolve().parent.parent
#: What an unprivileged server cannot have: gVisor; a CPU limit and a memory limit that
#: ends the sandbox (cgroups; its rlimit has a test of its own).
DESELECT = "not gvisor and not cpu_limit and not memory_bomb"

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS, _MS_REC, _MS_SLAVE = 0x00020000, 0x4000, 0x80000


def expose(path: str) -> None:
    """Make every directory down to ``path`` traversable by others, in this process's
    mount namespace only: each one that is not becomes a tmpfs (mode 0755) holding a
    bind of the single entry on the way down."""
    parts = Path(path).parts
    for depth in range(1, len(parts)):
        here = os.path.join(*parts[:depth])
        if os.stat(here).st_mode & 0o001:
            continue
        below = os.path.join(here, parts[depth])
        tree = clone(below, False, None)
        if _libc.mount(b"tmpfs", here.encode(), b"tmpfs", 0, b"mode=0755") != 0:
            raise StageError(ctypes.get_errno(), f"cannot cover {here}")
        attach(tree, below, below)


def _driver(uid: int, gid: int, argv: list[str]) -> str:
    """Python that runs ``argv`` as ``uid`` with the checkout exposed (as root)."""
    return (
        "import ctypes, os, sys\n"
        f"sys.path.insert(0, {str(CHECKOUT / 'tests')!r}); sys.path.insert(0, {str(CHECKOUT)!r})\n"
        "from test_unprivileged import expose\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.unshare({_CLONE_NEWNS}) == 0\n"
        f"assert libc.mount(None, b'/', None, {_MS_REC | _MS_SLAVE}, None) == 0\n"
        f"expose({sys.prefix!r}); expose({str(CHECKOUT)!r})\n"
        f"os.setgroups([]); os.setresgid({gid}, {gid}, {gid}); os.setresuid({uid}, {uid}, {uid})\n"
        f"os.chdir({str(CHECKOUT)!r})\n"
        f"os.execv({argv[0]!r}, {argv!r})\n"
    )  # fmt: skip


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: the other tests are this run")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                    "/nonexistent", "--shell", "/usr/sbin/nologin", USER], check=True)  # fmt: skip
    return pwd.getpwnam(USER)


def test_expose_makes_a_closed_path_traversable(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root")
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    (closed / "inner" / "file.txt").write_text("reachable")
    (closed / "sibling.txt").write_text("not on the way")
    closed.chmod(0o700)
    code = (
        "import ctypes, os, sys\n"
        f"sys.path.insert(0, {str(CHECKOUT / 'tests')!r}); sys.path.insert(0, {str(CHECKOUT)!r})\n"
        "from test_unprivileged import expose\n"
        "libc = ctypes.CDLL(None)\n"
        f"assert libc.unshare({_CLONE_NEWNS}) == 0\n"
        f"assert libc.mount(None, b'/', None, {_MS_REC | _MS_SLAVE}, None) == 0\n"
        f"expose({str(closed / 'inner')!r})\n"
        "os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        f"print(open({str(closed / 'inner' / 'file.txt')!r}).read(), "
        f"os.path.exists({str(closed / 'sibling.txt')!r}))\n"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["reachable", "False"], out.stderr
    assert closed.stat().st_mode & 0o777 == 0o700  # the host's view is untouched


def test_isolation_and_escapes_as_an_unprivileged_server(user: pwd.struct_passwd):
    home = Path(tempfile.mkdtemp(prefix="jupyter-sandbox-test-home-"))
    shutil.chown(home, user.pw_uid, user.pw_gid)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra",
            "-x", "tests/test_isolation.py", "tests/test_escapes.py", "-k", DESELECT]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "CI": os.environ.get("CI", ""), "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", _driver(user.pw_uid, user.pw_gid, argv)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    shutil.rmtree(home, ignore_errors=True)
    summary = run.stdout[-6000:] + run.stderr[-3000:]
    print(summary)
    assert run.returncode == 0, summary
    assert " passed" in run.stdout and " failed" not in run.stdout, summary
