"""Which host directories a kernel's Python interpreter needs, asked of the interpreter.

A sandbox shows the kernel only what it needs. For Python that is the
interpreter's prefixes and every directory on its ``sys.path`` (a venv,
a pyenv build under a home directory, an editable install elsewhere): all
bound read-only. Asking the interpreter itself is the only reliable way to
know them; the answer is cached per interpreter and PYTHONPATH.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

_PROBE = (
    "import json, sys\n"
    "print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix,"
    " 'exec_prefix': sys.exec_prefix, 'executable': sys.executable, 'path': sys.path}))"
)


class PythonProbeError(RuntimeError):
    pass


@functools.lru_cache(maxsize=32)
def python_dirs(executable: str, pythonpath: str = "") -> tuple[str, ...]:
    """Host paths (directories or files) the interpreter needs, real paths, no duplicates."""
    # Always ask a fresh interpreter: this process's own sys.path starts with its script's dir.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        out = subprocess.run(
            [executable, "-c", _PROBE],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        info = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise PythonProbeError(
            f"cannot ask the kernel's interpreter {executable!r} for its paths: {exc}"
        ) from exc
    candidates = [
        info["prefix"],
        info["base_prefix"],
        info["exec_prefix"],
        info["executable"],
        *[p for p in info["path"] if p],
    ]
    return tuple(dict.fromkeys(_real(p) for p in candidates if _real(p)))


def _real(path: str) -> str:
    real = os.path.realpath(path)
    return real if os.path.exists(real) else ""


def minimal_cover(paths: list[str]) -> list[str]:
    """Drop every path that lies inside another one of ``paths``."""
    kept: list[str] = []
    for path in sorted(set(paths), key=lambda p: (len(Path(p).parts), p)):
        if not any(is_within(path, parent) for parent in kept):
            kept.append(path)
    return kept


def is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def own_package_root(python_paths: tuple[str, ...] | list[str]) -> str | None:
    """The directory holding this package when ``python_paths`` do not cover it (a
    development checkout): a pooled sandbox's agent imports it from there."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return None if any(is_within(root, p) for p in python_paths) else root
