"""What Binder tests fetch from: git repositories and a Python package index, served over
plain HTTP from this machine's loopback by the test (never the internet).

* :func:`serve` serves a directory (git's dumb HTTP protocol needs nothing more);
* :func:`git_repo` commits a tree of files and makes it a served bare repository;
* :func:`wheel` writes a pure-Python wheel by hand (no build backend, no network);
  :func:`package_index` lays wheels out as a PEP 503 "simple" index.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import subprocess
import threading
import zipfile
from pathlib import Path

from testcluster.cluster import free_port

IDENT = ["-c", "user.name=t", "-c", "user.email=t@example.org"]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Served:
    """A directory served on 127.0.0.1 (a thread of the test process)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        handler = functools.partial(_Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(root: Path) -> Served:
    return Served(root)


def git_repo(root: Path, name: str, files: dict[str, str], executable: tuple[str, ...] = (),
             work: Path | None = None) -> str:  # fmt: skip
    """Commit ``files`` (path -> text) in a work tree (made, or ``work`` again for a second
    commit) and publish it as ``root/<name>.git`` for dumb HTTP; the new commit."""
    work = work or root / f"{name}-work"
    if not (work / ".git").exists():
        work.mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=work)
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
        if path in executable:
            (work / path).chmod(0o755)
    git(*IDENT, "add", ".", cwd=work)
    git(*IDENT, "commit", "-q", "-m", "update", cwd=work)
    bare = root / f"{name}.git"
    if not bare.exists():
        git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    else:
        git("push", "-q", str(bare), "main", cwd=work)
    git("update-server-info", cwd=bare)
    return git("rev-parse", "HEAD", cwd=work)


def wheel(directory: Path, name: str, version: str, code: str) -> Path:
    """A pure-Python wheel of one module ``name`` holding ``code``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": code,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }  # fmt: skip
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    target = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return target


def package_index(root: Path, wheels: list[Path]) -> Path:
    """``root/simple/<project>/`` pages linking each wheel (PEP 503); the index's root."""
    for built in wheels:
        project = built.name.split("-")[0].lower().replace("_", "-")
        page = root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        (page / built.name).write_bytes(built.read_bytes())
        (page / "index.html").write_text(f'<a href="{built.name}">{built.name}</a>\n')
    return root / "simple"
