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

What is read is bounded, as it goes into the launch page and the prepared commit's record
(which the Hub reads at every start of a server): ``environment.yml`` is YAML without
aliases (a few hundred bytes of nested aliases expand to gigabytes once written out),
nested :data:`YAML_DEPTH` deep at most, of :data:`YAML_NODES` nodes at most; its
dependencies are strings, or a ``pip:`` list of strings, at most :data:`ENTRY_LIMIT`
characters each and :data:`MAX_ENTRIES` in all (requirements likewise, with no control
character, and :data:`REQUIREMENTS_LIMIT` characters together); a message names at most
:data:`SHOWN` entries, each cut to :data:`SHOWN_LENGTH` characters.
"""

from __future__ import annotations

import os
import re
import reprlib
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import untrusted

#: Files repo2docker reads that this project does not build from.
UNSUPPORTED_FILES = ("Dockerfile", "default.nix", "install.R", "Project.toml", "Pipfile",
                     "Pipfile.lock", "DESCRIPTION", "REQUIRE")  # fmt: skip
_PLAIN = re.compile(r"^(python|pip)\s*([<>=!~].*)?$")
#: A Debian package name (Debian policy 5.6.1): lower case letters, digits, "+", "-", ".".
_DEBIAN_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,254}$")
#: Bytes a configuration file may have.
CONFIG_LIMIT = 1 << 20
#: Characters of one requirement, conda dependency or apt.txt name.
ENTRY_LIMIT = 4096
#: Requirements (requirements.txt and environment.yml's pip: list together), conda
#: dependencies, apt.txt names: at most this many each.
MAX_ENTRIES = 10_000
#: Characters of all requirements together (what the record keeps of them).
REQUIREMENTS_LIMIT = 1 << 20
#: environment.yml: how deep collections nest, and how many nodes (scalars, lists,
#: mappings) it has, at most.
YAML_DEPTH = 32
YAML_NODES = 50_000
#: A message names this many entries at most (then says how many more), each cut to
#: SHOWN_LENGTH characters.
SHOWN = 10
SHOWN_LENGTH = 100
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


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
            env.requirements += _requirements(_requirement_lines(requirements),
                                              "requirements.txt")  # fmt: skip
        conda = next((name for name in ("environment.yml", "environment.yaml")
                      if self._kind(name)), None)  # fmt: skip
        if conda is not None:
            _read_conda(self._text(conda) or "", env, conda)
        _check_requirements(env.requirements)
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


def _requirements(entries: list[Any], source: str) -> list[str]:
    """``entries`` as requirements, each a string of a bounded length with no control
    character; else :class:`BadRepository`."""
    if len(entries) > MAX_ENTRIES:
        raise BadRepository(f"{source} has more than {MAX_ENTRIES} requirements")
    checked: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise BadRepository(f"{source}: a pip requirement must be a string, not "
                                f"{_shown(entry)}; a pip: list holds only strings")  # fmt: skip
        if len(entry) > ENTRY_LIMIT:
            raise BadRepository(f"{source}: a requirement of more than {ENTRY_LIMIT} "
                                f"characters ({_shown(entry)})")  # fmt: skip
        if _CONTROL.search(entry):
            raise BadRepository(f"{source}: the requirement {_shown(entry)} has a control "
                                "character")  # fmt: skip
        checked.append(entry)
    return checked


def _check_requirements(requirements: list[str]) -> None:
    """The repository's requirements together are within bounds (they are kept)."""
    if len(requirements) > MAX_ENTRIES:
        raise BadRepository(f"the repository has more than {MAX_ENTRIES} requirements")
    if sum(map(len, requirements)) > REQUIREMENTS_LIMIT:
        raise BadRepository(f"the repository's requirements have more than "
                            f"{REQUIREMENTS_LIMIT} characters together")  # fmt: skip


class _Unaccepted(yaml.YAMLError):
    """YAML that is valid but not accepted (an alias, too deep, too large)."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a configuration file: no aliases, nesting and size bounded (checked as the
    document is composed, before anything is built from it). An alias makes its node appear
    once more at no cost in the file: nested, a few hundred bytes become gigabytes for
    whatever walks the result."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Unaccepted(f"uses a YAML alias (*{_shown(event.anchor, quote=False)}, line "
                              f"{event.start_mark.line + 1}); aliases (and merge keys, which "
                              "need one) are not accepted here: write the values out")  # fmt: skip
        self._nodes += 1
        if self._nodes > YAML_NODES:
            raise _Unaccepted(f"has more than {YAML_NODES} values")
        self._depth += 1
        try:
            if self._depth > YAML_DEPTH:
                raise _Unaccepted(f"nests deeper than {YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(text: str, name: str) -> object:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: no objects of Python's
    except _Unaccepted as exc:
        raise BadRepository(f"{name} {exc}") from None
    except yaml.YAMLError as exc:
        raise BadRepository(f"{name} is not valid YAML: {exc}") from None


def _read_conda(text: str, env: Environment, name: str) -> None:
    data = _load_yaml(text, name) or {}
    if not isinstance(data, dict):
        raise BadRepository(f"{name} is not a conda environment (a mapping)")
    dependencies = data.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise BadRepository(f"{name}: dependencies must be a list, not "
                            f"{_shown(dependencies)}")  # fmt: skip
    if len(dependencies) > MAX_ENTRIES:
        raise BadRepository(f"{name} has more than {MAX_ENTRIES} dependencies")
    conda: list[str] = []
    for dep in dependencies:
        if isinstance(dep, dict) and list(dep) == ["pip"]:
            pip = dep["pip"] if dep["pip"] is not None else []
            if not isinstance(pip, list):
                raise BadRepository(f"{name}: pip: must be a list of strings, not "
                                    f"{_shown(pip)}")  # fmt: skip
            env.requirements += _requirements(pip, name)
            continue
        if not isinstance(dep, str):
            raise BadRepository(f"{name}: a dependency must be a string (a conda package) or "
                                f"pip: with a list of strings, not {_shown(dep)}")  # fmt: skip
        if len(dep) > ENTRY_LIMIT:
            raise BadRepository(f"{name}: a dependency of more than {ENTRY_LIMIT} characters "
                                f"({_shown(dep)})")  # fmt: skip
        if match := _PLAIN.match(dep.strip()):
            if match.group(1) == "python" and match.group(2):
                version = match.group(2).lstrip("=<>!~ ")
                _check_python(".".join(version.split(".")[:2]), env, name)
        else:
            conda.append(dep)
    if conda:
        many = len(conda) > 1
        env.unsupported.append(f"{name}: conda package{'s' if many else ''} {_listed(conda)} "
                               f"{'are' if many else 'is'} not installed (only the pip: list "
                               "is)")  # fmt: skip


def _read_runtime(text: str, env: Environment) -> None:
    match = re.fullmatch(r"python-(\d+\.\d+)", text)
    if match is None:
        env.unsupported.append(f"runtime.txt: {_shown(text)} (only python-X.Y is)")
        return
    _check_python(match.group(1), env, "runtime.txt")


def _check_python(version: str, env: Environment, source: str) -> None:
    env.python = version
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version != here:
        env.unsupported.append(f"{source}: Python {_shown(version, quote=False)} asked for; "
                               f"this deployment runs Python {here}")  # fmt: skip


def _read_apt(wanted: list[str], env: Environment, installed: set[str] | None) -> None:
    """apt.txt: which of its packages are installed here; names that are no Debian package
    name are reported and never passed on (to dpkg-query they were options)."""
    if len(wanted) > MAX_ENTRIES:
        env.unsupported.append(f"apt.txt: more than {MAX_ENTRIES} names (none checked)")
        return
    names = [p for p in wanted if _DEBIAN_NAME.match(p)]
    bad = [p for p in wanted if not _DEBIAN_NAME.match(p)]
    if bad:
        env.unsupported.append(f"apt.txt: {_listed(bad)} "
                               f"{'is' if len(bad) == 1 else 'are'} not a Debian package name "
                               "(not checked)")  # fmt: skip
    present = installed if installed is not None else _installed(names)
    env.apt_packages = [p for p in names if p in present]
    missing = [p for p in names if p not in present]
    if missing:
        env.unsupported.append(f"apt.txt: {_listed(missing, quote=False)} not installed here "
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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, SHOWN_LENGTH, SHOWN_LENGTH
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 4


def _shown(value: object, quote: bool = True) -> str:
    """``value`` for a message: its repr (or, ``quote`` False, a string as it is), at most
    about :data:`SHOWN_LENGTH` characters, however large the value."""
    if isinstance(value, str) and not quote:
        value = value if len(value) <= SHOWN_LENGTH else value[: SHOWN_LENGTH - 3] + "..."
        return repr(value)[1:-1]
    return _REPR.repr(value)


def _listed(names: list[str], quote: bool = True) -> str:
    """The first :data:`SHOWN` of ``names`` (each as :func:`_shown`), and how many more."""
    shown = ", ".join(_shown(name, quote) for name in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
