"""What environment a repository asks for, read as repo2docker reads it.

The configuration lives in ``binder/``, else ``.binder/``, else the repository's root
(both ``binder/`` and ``.binder/`` is an error, as in repo2docker). What this project
prepares: ``requirements.txt``; the pip-installable part of ``environment.yml`` (its
``pip:`` list, and plain ``python``/``pip`` entries); ``runtime.txt`` (``python-X.Y``:
checked against the Python there is); ``apt.txt`` only for packages already installed;
``postBuild`` (run once, at preparation) and ``start`` (the launch's entrypoint).
Everything else is reported, by name, as not supported, never silently dropped.

The repository is fetched from anywhere and may hold links: its files are read beneath the
checkout's descriptor, never through a link (a configuration file or directory that is
one is refused), and at most :data:`CONFIG_LIMIT` bytes each. ``apt.txt``'s names are
checked against Debian's form of a package name before ``dpkg-query`` sees them (after
``--``): anything else is reported, never passed.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import untrusted

#: Files repo2docker reads that this project does not build from.
UNSUPPORTED_FILES = ("Dockerfile", "default.nix", "install.R", "Project.toml", "Pipfile",
                     "Pipfile.lock", "DESCRIPTION", "REQUIRE")  # fmt: skip
_PLAIN = re.compile(r"^(python|pip)\s*([<>=!~].*)?$")
#: A Debian package name (Debian policy 5.6.1): lower case letters, digits, "+", "-", ".".
_DEBIAN_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
#: Bytes a configuration file may have.
CONFIG_LIMIT = 1 << 20


class BadRepository(ValueError):
    """The repository's configuration cannot be used; the message says why."""


@dataclass
class Environment:
    #: Where the configuration was found (the repository's root, binder/ or .binder/).
    config_dir: Path
    requirements: list[str] = field(default_factory=list)
    python: str | None = None  # from runtime.txt, e.g. "3.11"
    apt_packages: list[str] = field(default_factory=list)
    post_build: Path | None = None
    start: Path | None = None
    #: Messages about what the repository asks for that this project does not prepare.
    unsupported: list[str] = field(default_factory=list)


def read_environment(repo: Path, installed: set[str] | None = None) -> Environment:
    """The environment ``repo`` asks for; :class:`BadRepository` for a contradiction, a
    link or a file too large. ``installed``: the Debian packages present (default: asked
    of dpkg)."""
    root = untrusted.open_dir(repo)
    try:
        return _Reader(repo, root).read(installed)
    finally:
        os.close(root)


@dataclass
class _Reader:
    """The checkout ``repo``, open at ``root``: its entries looked at without following."""

    repo: Path
    root: int
    config: str = ""

    def read(self, installed: set[str] | None) -> Environment:
        candidates = [d for d in ("binder", ".binder") if self._kind(d, is_dir=True)]
        if len(candidates) > 1:
            raise BadRepository("the repository has both binder/ and .binder/: keep one")
        self.config = candidates[0] if candidates else ""
        env = Environment(self.repo / self.config)
        if (requirements := self._text("requirements.txt")) is not None:
            env.requirements += _requirement_lines(requirements)
        conda = next((name for name in ("environment.yml", "environment.yaml")
                      if self._kind(name)), None)  # fmt: skip
        if conda is not None:
            _read_conda(self._text(conda) or "", env, conda)
        runtime = self._text("runtime.txt")
        if runtime is not None and conda is None:  # repo2docker ignores it then
            _read_runtime(runtime.strip(), env)
        if (apt := self._text("apt.txt")) is not None:
            _read_apt(_requirement_lines(apt), env, installed)
        for name, attr in (("postBuild", "post_build"), ("start", "start")):
            if self._kind(name):
                setattr(env, attr, self.repo / self._path(name))
        for name in UNSUPPORTED_FILES:
            if self._lstat(self._path(name)) is not None:  # a link too: never followed
                env.unsupported.append(f"{name}: not supported (only requirements.txt, "
                                       "environment.yml's pip part, runtime.txt, apt.txt, "
                                       "postBuild and start are)")  # fmt: skip
        return env

    def _path(self, name: str) -> str:
        return f"{self.config}/{name}" if self.config else name

    def _lstat(self, path: str) -> os.stat_result | None:
        parent, _, name = path.rpartition("/")
        fd = untrusted.open_beneath(self.root, parent, os.O_RDONLY | os.O_DIRECTORY) \
            if parent else self.root  # fmt: skip
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            if fd != self.root:
                os.close(fd)

    def _kind(self, name: str, is_dir: bool = False) -> bool:
        """Whether the configuration has ``name``, a regular file (or a directory). A link
        is refused: it could point at a file of the machine preparing the environment."""
        path = name if is_dir else self._path(name)
        found = self._lstat(path)
        if found is not None and stat.S_ISLNK(found.st_mode):
            raise BadRepository(f"{path} is a symbolic link: configuration files must be "
                                "files of the repository")  # fmt: skip
        if found is None:
            return False
        return stat.S_ISDIR(found.st_mode) if is_dir else stat.S_ISREG(found.st_mode)

    def _text(self, name: str) -> str | None:
        """The configuration file ``name``'s text; None when there is none."""
        if not self._kind(name):
            return None
        path = self._path(name)
        try:
            data = untrusted.read_file(self.root, path, CONFIG_LIMIT)
        except untrusted.Refused as exc:
            raise BadRepository(f"{path}: {exc}") from None
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise BadRepository(f"{path} is not UTF-8 text") from None


def _requirement_lines(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _read_conda(text: str, env: Environment, name: str) -> None:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise BadRepository(f"{name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BadRepository(f"{name} is not a conda environment (a mapping)")
    for dep in data.get("dependencies") or []:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            env.requirements += [str(r) for r in dep["pip"]]
        elif isinstance(dep, str) and (match := _PLAIN.match(dep.strip())):
            if match.group(1) == "python" and match.group(2):
                version = match.group(2).lstrip("=<>!~ ")
                _check_python(".".join(version.split(".")[:2]), env, name)
        else:
            env.unsupported.append(f"{name}: conda package {dep!r} is not installed "
                                   "(only the pip: list is)")  # fmt: skip


def _read_runtime(text: str, env: Environment) -> None:
    match = re.fullmatch(r"python-(\d+\.\d+)", text)
    if match is None:
        env.unsupported.append(f"runtime.txt: {text!r} (only python-X.Y is)")
        return
    _check_python(match.group(1), env, "runtime.txt")


def _check_python(version: str, env: Environment, source: str) -> None:
    env.python = version
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version != here:
        env.unsupported.append(f"{source}: Python {version} asked for; this deployment "
                               f"runs Python {here}")  # fmt: skip


def _read_apt(wanted: list[str], env: Environment, installed: set[str] | None) -> None:
    """apt.txt: which of its packages are installed here; names that are no Debian package
    name are reported and never passed on (to dpkg-query they were options)."""
    names = [p for p in wanted if _DEBIAN_NAME.match(p)]
    bad = [p for p in wanted if not _DEBIAN_NAME.match(p)]
    if bad:
        env.unsupported.append(f"apt.txt: {', '.join(map(repr, bad))} "
                               f"{'is' if len(bad) == 1 else 'are'} not a Debian package name "
                               "(not checked)")  # fmt: skip
    present = installed if installed is not None else _installed(names)
    env.apt_packages = [p for p in names if p in present]
    missing = [p for p in names if p not in present]
    if missing:
        env.unsupported.append(f"apt.txt: {', '.join(missing)} not installed here "
                               "(packages are not installed at launch)")  # fmt: skip


def _installed(packages: list[str]) -> set[str]:
    """The packages of ``packages`` (Debian package names) installed here."""
    if not packages:
        return set()
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", "--", *packages],
        capture_output=True, text=True,
    )  # fmt: skip
    return {line.split()[0] for line in result.stdout.splitlines() if line.endswith(" installed")}
