"""Container images for the real test node, built without a registry or docker.

The real node (containerd 1.6 with CRI, kubelet 1.20: ``testcluster/realnode.py``)
runs pods from images imported with ``ctr -n k8s.io images import``; pods say
``imagePullPolicy: IfNotPresent``/``Never``, so nothing is ever pulled. Both
images are written here as docker-archive tarballs, straight from the host's
files through :mod:`tarfile` (no staging copy of any tree):

* :data:`PAUSE_IMAGE`: the pod sandbox's init, one static ``/pause`` binary
  (containerd's ``sandbox_image`` names it; there is no registry to pull it from).
* :data:`PYTHON_IMAGES`: the host's Python 3.11 with the project's virtualenv, as
  the kernel and single-user images have it (``binder/kernel.Dockerfile``). Two
  layers: a base (interpreter, shared libraries, stdlib, third-party packages)
  cached on disk under a key of the inputs that determine it, because it is
  hundreds of MB and changes only when the venv does; and a small top layer with
  this project's packages, rebuilt on every call because the code under test
  changes between runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

PAUSE_IMAGE = "jupyter-sandbox.test/pause:3.2"
#: ``:latest`` tags, as the shipped manifests name them (their pods then say
#: ``imagePullPolicy: IfNotPresent``), and a fixed tag, which the kubelet does not pull when
#: present, for pods whose pull policy the code under test leaves to the default (Binder's).
PYTHON_IMAGES = ("jupyter-sandbox-kernel:latest", "jupyter-sandbox-singleuser:latest",
                 "jupyter-sandbox-singleuser:test")

REPO = Path(__file__).resolve().parent.parent
# The environment the tests run in is the one the pods should have.
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv"
SITE_PACKAGES = VENV / "lib" / "python3.11" / "site-packages"
PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
# Debian's python puts this directory on sys.path (its site.py), not site-packages.
IMAGE_SITE = "usr/local/lib/python3.11/dist-packages"

PROJECT_DIST = "jupyter-sandbox"
PROJECT_PACKAGES = ("agent_sandbox", "sandbox_provisioner", "sandbox_spawner")
# Distributions no pod imports, left out of the image (about 320 MB of 830).
EXCLUDED_DISTS = (
    "playwright",  # the tests' browser driver (170 MB), runs on the host only
    "kubernetes",  # the sync client (130 MB): pods use kubernetes_asyncio
    "k8s-agent-sandbox",  # upstream's SDK on the sync client, used by tests on the host
    "ruff",  # the linter
)
# Programs some tools and probes expect in any image; their libraries come along.
HOST_TOOLS = ("/usr/bin/dash", "/usr/bin/sleep", "/usr/bin/cat", "/usr/bin/ls", "/usr/bin/env")
# Loaded at run time, so ldd does not name them: libgcc_s by glibc (pthread_exit/cancel
# unwinding), libseccomp by pyseccomp through ctypes (the bubblewrap runtime's module, which
# sandbox_provisioner.runtimes imports with every other runtime, also in a pod).
DLOPENED_LIBS = ("libgcc_s.so.1", "libseccomp.so.2")
# ctypes.util.find_library() asks `/sbin/ldconfig -p`, which reads /etc/ld.so.cache.
LDCONFIG = "/sbin/ldconfig"
JOVYAN = 1000
EPOCH = 946684800  # 2000-01-01: fixed mtime where the real one does not matter
ENV = (
    "PATH=/usr/local/bin:/usr/bin:/bin",
    "HOME=/home/jovyan",
    "LANG=C.UTF-8",
    "PYDEVD_DISABLE_FILE_VALIDATION=1",  # as binder/kernel.Dockerfile
)

_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
    "jovyan:x:1000:1000:jovyan:/home/jovyan:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\njovyan:x:1000:\nnogroup:x:65534:\n",
    # glibc >= 2.34 has the files and dns backends built in: no libnss_* to ship.
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    "networks: files\nprotocols: files\nservices: files\n",
}


@dataclass(frozen=True)
class _Entry:
    kind: str  # "dir", "file" (host path), "data" (bytes) or "symlink"
    mode: int = 0o755
    source: str = ""
    data: bytes = b""
    target: str = ""
    owner: int = 0
    mtime: int | None = None  # None: the host file's own (file entries)


class _Layer:
    """The entries of one layer tar, by path; written sorted so equal inputs give equal tars."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def add(self, path: str, entry: _Entry) -> None:
        self.entries.setdefault(path.strip("/"), entry)

    def host_path(self, path: str) -> list[str]:
        """Add a host file under its own path, with every symlink met on the way to it.

        ``/lib64/ld-linux-x86-64.so.2`` on a merged-/usr host is two links
        (``/lib64`` and the loader's) before the real file; the image needs all
        three so that ELF interpreters and ldd's paths resolve there too. Returns the
        paths of the chain.
        """
        chain = []
        p = os.path.normpath(path)
        for _ in range(40):
            parts = p.strip("/").split("/")
            for i in range(len(parts)):
                prefix = "/" + "/".join(parts[: i + 1])
                if os.path.islink(prefix):
                    target = os.readlink(prefix)
                    self.add(prefix, _Entry("symlink", target=target))
                    chain.append(prefix.lstrip("/"))
                    resolved = os.path.join(os.path.dirname(prefix), target)
                    p = os.path.normpath(os.path.join(resolved, *parts[i + 1 :]))
                    break
            else:
                self.add(p, _Entry("file", source=p))
                return [*chain, p.lstrip("/")]
        raise RuntimeError(f"too many symlinks resolving {path}")

    def tree(
        self,
        src: Path,
        dest: str,
        skip: Callable[[str], bool] = lambda rel: False,
        mtime: int | None = None,
    ) -> None:
        """Add the tree ``src`` at ``dest``; ``skip`` gets paths relative to ``src``."""
        for dirpath, dirnames, filenames in os.walk(src):
            rel_dir = os.path.relpath(dirpath, src)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            self.add(f"{dest}/{rel_dir}", _Entry("dir", os.lstat(dirpath).st_mode & 0o7777))
            keep = []
            for name in sorted(dirnames) + sorted(filenames):
                rel, full = rel_dir + name, os.path.join(dirpath, name)
                if skip(rel):
                    continue
                if os.path.islink(full):
                    self.add(f"{dest}/{rel}", _Entry("symlink", target=os.readlink(full)))
                elif name in dirnames:
                    keep.append(name)
                else:
                    self.add(f"{dest}/{rel}", _Entry("file", source=full, mtime=mtime))
            dirnames[:] = keep

    def write(self, out: BinaryIO) -> None:
        """Write the tar: parents first (sorted paths), uid 0 unless an entry says otherwise."""
        entries = dict(self.entries)
        for path in list(entries):
            parent = os.path.dirname(path)
            while parent and parent not in entries:
                entries[parent] = _Entry("dir")
                parent = os.path.dirname(parent)
        tar = tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20)
        with tar:
            for path in sorted(entries):
                e = entries[path]
                info = tarfile.TarInfo(path)
                info.uid = info.gid = e.owner
                info.mode, info.mtime = e.mode, EPOCH if e.mtime is None else e.mtime
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.target, 0o777
                    tar.addfile(info)
                elif e.kind == "data":
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
                else:
                    try:
                        f = open(e.source, "rb")  # noqa: SIM115 (closed below)
                    except FileNotFoundError:  # e.g. a .pyc replaced by a running test
                        continue
                    with f:
                        st = os.fstat(f.fileno())
                        info.size, info.mode = st.st_size, st.st_mode & 0o7777
                        # The real mtime: __pycache__ files are valid only for it, and
                        # pods cannot rewrite them (read-only root, uid 1000).
                        info.mtime = int(st.st_mtime) if e.mtime is None else e.mtime
                        tar.addfile(info, f)


class _HashingWriter:
    """A write-only file that hashes what goes through: the layer's diff_id for free."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def tell(self) -> int:
        return self.size


_Dist = metadata.Distribution


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _atomic_write(dest: Path, writer: Callable[[BinaryIO], None]) -> None:
    """Write ``dest`` through a temporary file and a rename: no half file at ``dest``."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer(f)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _console_scripts(dist: _Dist) -> list[str]:
    """The venv's bin/ scripts a distribution installed (from its RECORD)."""
    return [f.name for f in dist.files or () if str(f).startswith("../../../bin/")]


def _add_scripts(layer: _Layer, names: Iterable[str], mtime: int | None = None) -> None:
    """Add venv scripts to /usr/local/bin, their shebang pointing at the image's python."""
    shebang = re.compile(rb"#!" + re.escape(str(VENV).encode()) + rb"/bin/python[0-9.]*\n")
    for name in names:
        data = (VENV / "bin" / name).read_bytes()
        if m := shebang.match(data):
            data = b"#!/usr/bin/python3.11\n" + data[m.end() :]
            layer.add(f"usr/local/bin/{name}", _Entry("data", data=data, mtime=mtime))


def _shared_libraries(binaries: Sequence[str], bundled: Sequence[Path]) -> set[str]:
    """Every library ``ldd`` names for ``binaries`` that is not under a ``bundled`` tree.

    (Wheels bring their own under ``<pkg>.libs``, which ldd finds through RPATH.)
    """
    roots = tuple(str(p.resolve()) + "/" for p in bundled)
    found: set[str] = set()
    missing: set[str] = set()
    for i in range(0, len(binaries), 200):
        out = subprocess.run(
            ["ldd", *binaries[i : i + 200]], capture_output=True, text=True, check=False
        ).stdout
        for line in out.splitlines():
            if m := re.match(r"\s+(?:\S+ => )?(/\S+) \(0x", line):
                if not os.path.realpath(m[1]).startswith(roots):
                    found.add(m[1])
            elif m := re.match(r"\s+(\S+) => not found", line):
                missing.add(m[1])
    if missing:
        raise RuntimeError(f"ldd cannot find {sorted(missing)} for the python image")
    libdir = os.path.dirname(next(p for p in found if os.path.basename(p) == "libc.so.6"))
    return found | {os.path.join(libdir, name) for name in DLOPENED_LIBS}


def _ld_so_cache(libs: dict[str, _Entry]) -> bytes:
    """The image's /etc/ld.so.cache, made by ``ldconfig -r`` over its libraries ``libs``.

    (Not the host's cache, which names libraries the image lacks.) ldconfig reads real
    directories: a small temporary tree of hard links (copies where links cannot go).
    """
    with tempfile.TemporaryDirectory(prefix="images-ldconfig-") as tmp:
        for path, e in sorted(libs.items()):
            dest = os.path.join(tmp, path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if e.kind == "symlink":
                os.symlink(e.target, dest)
            else:
                try:
                    os.link(e.source, dest)
                except OSError:
                    shutil.copy2(e.source, dest)
        os.makedirs(os.path.join(tmp, "etc"))
        Path(tmp, "etc", "ld.so.conf").write_text("")
        subprocess.run([LDCONFIG, "-X", "-r", tmp], check=True, capture_output=True)
        return Path(tmp, "etc", "ld.so.cache").read_bytes()


def _dists() -> tuple[list[_Dist], list[_Dist], _Dist]:
    """The venv's distributions: (kept, excluded, this project's)."""
    kept, excluded, project = [], [], None
    for dist in metadata.distributions(path=[str(SITE_PACKAGES)]):
        name = _norm(dist.metadata["Name"])
        if name == PROJECT_DIST:
            project = dist
        else:
            (excluded if name in EXCLUDED_DISTS else kept).append(dist)
    if project is None:
        raise RuntimeError(f"{PROJECT_DIST} is not installed in {VENV}")
    return kept, excluded, project


def _top_names(dists: Iterable[_Dist]) -> set[str]:
    return {f.parts[0] for d in dists for f in d.files or () if f.parts[0] != ".."}


def _base_key(kept: Sequence[_Dist]) -> str:
    """What the base layer is made of: this module, the interpreter, libc, the venv's packages."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(str(VENV).encode())
    for p in (PYTHON, Path("/usr/lib/x86_64-linux-gnu/libc.so.6"), STDLIB):
        st = os.stat(p)
        h.update(f"{p} {st.st_size} {st.st_mtime_ns}\n".encode())
    for name in sorted(f"{_norm(d.metadata['Name'])}=={d.version}" for d in kept):
        h.update(name.encode() + b"\n")
    for extra in (VENV / "etc" / "jupyter", VENV / "share" / "jupyter" / "kernels"):
        for p in sorted(extra.rglob("*")):
            h.update(f"{p} {p.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _base_layer(kept: Sequence[_Dist], excluded: Sequence[_Dist]) -> _Layer:
    layer = _Layer()
    for name in ("bin", "lib", "lib64", "sbin"):  # merged /usr, as the host's paths assume
        if os.path.islink(f"/{name}"):
            layer.add(name, _Entry("symlink", target=os.readlink(f"/{name}")))
    layer.host_path(str(PYTHON))
    layer.add("usr/bin/python3", _Entry("symlink", target="python3.11"))
    layer.add("usr/bin/python", _Entry("symlink", target="python3.11"))
    layer.add("usr/bin/sh", _Entry("symlink", target="dash"))
    for tool in HOST_TOOLS:
        layer.host_path(tool)
    # The static libpython archives (25 MB) serve only C builds.
    layer.tree(
        STDLIB,
        str(STDLIB).lstrip("/"),
        lambda rel: rel.startswith("config-3.11") and rel.endswith(".a"),
    )
    # Whole top-level names of the left-out distributions, the editable finder, and this
    # project's packages (the top layer has them); names shared with a kept one stay.
    drop = (_top_names(excluded) - _top_names(kept) - {"__pycache__"}) | set(PROJECT_PACKAGES)

    def skip(rel: str) -> bool:
        top, _, rest = rel.partition("/")
        if top.startswith("__editable__") or top in drop:
            return True
        if "__pycache__/" in rel and not rel.endswith(".pyc"):  # a .pyc being written
            return True
        if top == "__pycache__":  # top-level modules' bytecode: <module>.cpython-311.pyc
            module = rest.split(".", 1)[0]
            return module.startswith("__editable__") or f"{module}.py" in drop
        return False

    layer.tree(SITE_PACKAGES, IMAGE_SITE, skip)
    # Kernelspecs, server extension config, JupyterLab's and the Hub's static files, where
    # jupyter_core (/usr/local/{share,etc}/jupyter), jupyterlab and jupyterhub look for them.
    for sub in ("share/jupyter", "share/jupyterhub", "etc/jupyter"):
        if (VENV / sub).is_dir():
            layer.tree(VENV / sub, f"usr/local/{sub}")
    _add_scripts(layer, sorted({s for d in kept for s in _console_scripts(d)}))
    so = re.compile(r"\.so(\.[0-9.]+)?$")
    binaries = [str(PYTHON), *HOST_TOOLS, LDCONFIG]
    binaries += [
        e.source for e in layer.entries.values() if e.kind == "file" and so.search(e.source)
    ]
    libs = [
        p
        for lib in _shared_libraries(binaries, [SITE_PACKAGES, STDLIB])
        for p in layer.host_path(lib)
    ]
    layer.host_path(LDCONFIG)
    cache = _ld_so_cache({p: layer.entries[p] for p in libs})
    layer.add("etc/ld.so.cache", _Entry("data", 0o644, data=cache))
    for path, text in _ETC.items():
        layer.add(path, _Entry("data", 0o644, data=text.encode()))
    layer.add("home/jovyan", _Entry("dir", 0o755, owner=JOVYAN))
    layer.add("root", _Entry("dir", 0o700))
    for path in ("tmp", "var/tmp"):
        layer.add(path, _Entry("dir", 0o1777))
    for path in ("proc", "sys", "dev", "run", "usr/sbin"):
        layer.add(path, _Entry("dir"))
    return layer


def _cached_base(cache: Path) -> tuple[Path, str, _Dist]:
    """The base layer tar in ``cache`` and its diff_id, built when missing."""
    kept, excluded, project = _dists()
    key = _base_key(kept)
    tar, meta = cache / f"python-base-{key}.tar", cache / f"python-base-{key}.json"
    if tar.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("size") == tar.stat().st_size:
            return tar, info["diff_id"], project
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(".python-base-*.tmp"):  # left by a killed build
        if stale.stat().st_mtime < time.time() - 3600:
            stale.unlink(missing_ok=True)
    layer = _base_layer(kept, excluded)
    digest: dict[str, str | int] = {}

    def write(f: BinaryIO) -> None:
        w = _HashingWriter(f)
        layer.write(w)  # type: ignore[arg-type]
        digest.update(diff_id=w.sha.hexdigest(), size=w.size)

    _atomic_write(tar, write)
    _atomic_write(meta, lambda f: f.write(json.dumps(digest).encode()))
    for old in cache.glob("python-base-*"):  # earlier keys: each is hundreds of MB
        if old not in (tar, meta):
            old.unlink(missing_ok=True)
    return tar, str(digest["diff_id"]), project


def _project_layer(project: _Dist) -> bytes:
    """This project's packages as real files, its dist-info (entry points) and scripts."""
    layer = _Layer()

    def skip(rel: str) -> bool:
        return "__pycache__" in rel.split("/") or rel.endswith(".pyc")

    for pkg in PROJECT_PACKAGES:
        layer.tree(REPO / pkg, f"{IMAGE_SITE}/{pkg}", skip, mtime=EPOCH)
    # The cluster kernelspecs, as binder/kernel.Dockerfile's servers have them installed.
    kernelspecs = REPO / "jupyter_config" / "kubernetes" / "kernels"
    layer.tree(kernelspecs, "usr/local/share/jupyter/kernels", skip, mtime=EPOCH)
    info_dir = next(f for f in project.files or () if f.parts[0].endswith(".dist-info")).parts[0]
    # Not RECORD (it lists the editable finder) nor direct_url.json (says "editable").
    for name in ("METADATA", "entry_points.txt", "top_level.txt", "WHEEL", "INSTALLER"):
        if (SITE_PACKAGES / info_dir / name).exists():
            layer.add(
                f"{IMAGE_SITE}/{info_dir}/{name}",
                _Entry("file", source=str(SITE_PACKAGES / info_dir / name), mtime=EPOCH),
            )
    _add_scripts(layer, _console_scripts(project), mtime=EPOCH)
    buf = io.BytesIO()
    layer.write(buf)
    return buf.getvalue()


def _write_archive(
    out: Path, tags: Sequence[str], config: dict, layers: Sequence[Path | bytes]
) -> None:
    """A docker-archive (``docker save`` layout) of uncompressed layers: tar or bytes each."""
    diff_ids = config["rootfs"]["diff_ids"]
    cfg = json.dumps(config, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    names = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": list(tags), "Layers": names}])

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
        tar.addfile(info, io.BytesIO(data))

    def write(f: BinaryIO) -> None:
        with tarfile.TarFile(fileobj=f, mode="w", copybufsize=1 << 20) as tar:
            for name, layer in zip(names, layers, strict=True):
                if isinstance(layer, bytes):
                    add_bytes(tar, name, layer)
                    continue
                with open(layer, "rb") as src:  # streamed, never read whole
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = os.fstat(src.fileno()).st_size, 0o644, EPOCH
                    tar.addfile(info, src)
            add_bytes(tar, cfg_name, cfg)
            add_bytes(tar, "manifest.json", manifest.encode())

    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, write)


def _config(
    diff_ids: Sequence[str],
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] = (),
    workdir: str = "/",
    user: str = "",
) -> dict:
    cfg: dict = {"Env": list(env), "WorkingDir": workdir}
    if entrypoint:
        cfg["Entrypoint"] = list(entrypoint)
    if cmd:
        cfg["Cmd"] = list(cmd)
    if user:
        cfg["User"] = user
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
        "history": [
            {"created": "2000-01-01T00:00:00Z", "created_by": "testcluster/images.py"}
            for _ in diff_ids
        ],
    }


def build_pause_image(pause_binary: Path, out: Path) -> Path:
    """Write ``out/pause.tar``: :data:`PAUSE_IMAGE`, one layer holding ``/pause``."""
    layer = _Layer()
    layer.add("pause", _Entry("file", source=str(pause_binary), mtime=EPOCH))
    buf = io.BytesIO()
    layer.write(buf)
    data = buf.getvalue()
    config = _config([hashlib.sha256(data).hexdigest()], entrypoint=["/pause"])
    _write_archive(out / "pause.tar", [PAUSE_IMAGE], config, [data])
    return out / "pause.tar"


def build_python_image(cache: Path, out: Path, tags: Sequence[str] = PYTHON_IMAGES) -> Path:
    """Write ``out/python.tar``: the Python image under every name in ``tags``.

    The base layer comes from ``cache`` (built there first when its key is new:
    ~10 s with the venv in the page cache, longer from a cold disk; other keys' bases
    are then deleted); the project layer and the archive are written every time.
    """
    base, base_id, project = _cached_base(cache)
    top = _project_layer(project)
    config = _config(
        [base_id, hashlib.sha256(top).hexdigest()],
        cmd=["python", "-m", "sandbox_provisioner.agent", "serve"],
        env=ENV,
        workdir="/home/jovyan",
        user=f"{JOVYAN}",
    )
    _write_archive(out / "python.tar", tags, config, [base, top])
    return out / "python.tar"
