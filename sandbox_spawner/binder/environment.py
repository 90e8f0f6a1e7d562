"""What environment a repository asks for, read as repo2docker reads it.

The configuration lives in ``binder/``, else ``.binder/``, else the repository's root
(both ``binder/`` and ``.binder/`` is an error, as in repo2docker). What this project
prepares: ``requirements.txt``; the pip-installable part of ``environment.yml`` (its
``pip:`` list, and plain ``python``/``pip`` entries); ``runtime.txt`` (``python-X.Y``:
checked against the Python there is); ``apt.txt`` only for packages already installed;
``postBuild`` (run once, at preparation) and ``start`` (the launch's entrypoint).
Everything else is reported, by name, as not supported, never silently dropped.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: Files repo2docker reads that this project does not build from.
UNSUPPORTED_FILES = ("Dockerfile", "default.nix", "install.R", "Project.toml", "Pipfile",
                     "Pipfile.lock", "DESCRIPTION", "REQUIRE")  # fmt: skip
_PLAIN = re.compile(r"^(python|pip)\s*([<>=!~].*)?$")


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
    """The environment ``repo`` asks for; :class:`BadRepository` for a contradiction.
    ``installed``: the Debian packages present (default: asked of dpkg)."""
    candidates = [d for d in (repo / "binder", repo / ".binder") if _entry(d, repo, is_dir=True)]
    if len(candidates) > 1:
        raise BadRepository("the repository has both binder/ and .binder/: keep one")
    env = Environment(candidates[0] if candidates else repo)
    where = env.config_dir
    requirements = _entry(where / "requirements.txt", repo)
    if requirements:
        env.requirements += _requirement_lines(requirements.read_text())
    conda = next((found for n in ("environment.yml", "environment.yaml")
                  if (found := _entry(where / n, repo))), None)  # fmt: skip
    if conda is not None:
        _read_conda(conda, env)
    runtime = _entry(where / "runtime.txt", repo)
    if runtime and conda is None:  # repo2docker ignores it beside environment.yml
        _read_runtime(runtime.read_text().strip(), env)
    apt = _entry(where / "apt.txt", repo)
    if apt:
        wanted = _requirement_lines(apt.read_text())
        present = installed if installed is not None else _installed(wanted)
        env.apt_packages = [p for p in wanted if p in present]
        missing = [p for p in wanted if p not in present]
        if missing:
            env.unsupported.append(f"apt.txt: {', '.join(missing)} not installed here "
                                   "(packages are not installed at launch)")  # fmt: skip
    for name, attr in (("postBuild", "post_build"), ("start", "start")):
        setattr(env, attr, _entry(where / name, repo))
    for name in UNSUPPORTED_FILES:
        if (where / name).exists():
            env.unsupported.append(f"{name}: not supported (only requirements.txt, "
                                   "environment.yml's pip part, runtime.txt, apt.txt, "
                                   "postBuild and start are)")  # fmt: skip
    return env


def _entry(path: Path, repo: Path, is_dir: bool = False) -> Path | None:
    """``path`` if it is a regular file (or directory) of the repository itself. A symbolic
    link is refused: it could point at a file of the machine preparing the environment."""
    if path.is_symlink():
        raise BadRepository(f"{path.relative_to(repo)} is a symbolic link: configuration "
                            "files must be files of the repository")  # fmt: skip
    found = path.is_dir() if is_dir else path.is_file()
    return path if found else None


def _requirement_lines(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _read_conda(path: Path, env: Environment) -> None:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadRepository(f"{path.name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BadRepository(f"{path.name} is not a conda environment (a mapping)")
    for dep in data.get("dependencies") or []:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            env.requirements += [str(r) for r in dep["pip"]]
        elif isinstance(dep, str) and (match := _PLAIN.match(dep.strip())):
            if match.group(1) == "python" and match.group(2):
                version = match.group(2).lstrip("=<>!~ ")
                _check_python(".".join(version.split(".")[:2]), env, path.name)
        else:
            env.unsupported.append(f"{path.name}: conda package {dep!r} is not installed "
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


def _installed(packages: list[str]) -> set[str]:
    if not packages:
        return set()
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *packages],
        capture_output=True, text=True,
    )  # fmt: skip
    return {line.split()[0] for line in result.stdout.splitlines() if line.endswith(" installed")}
