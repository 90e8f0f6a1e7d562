"""Binder-style links: BinderHub's link forms read as mybinder.org reads them, what must
not be fetched refused, and refs resolved to commits against a real git server (dumb
HTTP, served from this machine's loopback by the test; never the internet)."""

from __future__ import annotations

import asyncio
import functools
import http.server
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from sandbox_spawner.binder.links import BadLink, LinkPolicy, launch_path
from sandbox_spawner.binder.refs import resolve
from testcluster.cluster import free_port

POLICY = LinkPolicy()


@pytest.mark.parametrize(
    ("provider", "spec", "url", "ref"),
    [
        ("gh", "binder-examples/requirements/main",
         "https://github.com/binder-examples/requirements", "main"),
        ("gh", "org/repo.git/HEAD", "https://github.com/org/repo", "HEAD"),
        ("gh", "org/repo/feature%2Fx", "https://github.com/org/repo", "feature/x"),
        ("gl", "group%2Fsub%2Fproject/v1.0", "https://gitlab.com/group/sub/project", "v1.0"),
        ("gist", "someone/0123abcd", "https://gist.github.com/someone/0123abcd.git", "HEAD"),
        ("gist", "someone/0123abcd/main", "https://gist.github.com/someone/0123abcd.git", "main"),
        ("git", f"{quote('https://github.com/org/repo.git', safe='')}/abc",
         "https://github.com/org/repo.git", "abc"),
    ],
)  # fmt: skip
def test_link_forms(provider, spec, url, ref):
    link = POLICY.parse(provider, spec)
    assert (link.url, link.ref, link.provider) == (url, ref, provider)


@pytest.mark.parametrize(
    ("provider", "spec", "reason"),
    [
        ("zenodo", "10.5281/zenodo.1", "unknown-provider"),
        ("gh", "org/repo", "malformed"),  # no ref
        ("gh", "org/../x/main", "malformed"),
        ("gh", "org/repo/--upload-pack=evil", "malformed"),  # not an option to git
        ("gl", "project/main", "malformed"),  # a namespace has a group
        ("git", quote("file:///etc", safe="") + "/main", "disallowed-host"),
        ("git", quote("ext::sh -c touch% /tmp/pwned", safe="") + "/main", "disallowed-host"),
        ("git", quote("ssh://github.com/org/repo", safe="") + "/main", "disallowed-host"),
        ("git", quote("https://evil.example/repo.git", safe="") + "/main", "disallowed-host"),
    ],
)  # fmt: skip
def test_bad_links_say_why(provider, spec, reason):
    with pytest.raises(BadLink) as error:
        POLICY.parse(provider, spec)
    assert error.value.reason == reason, error.value
    assert str(error.value)


def test_allowed_hosts_are_the_deployments():
    policy = LinkPolicy(allowed_hosts=["git.example.org", "*.uni.example"])
    assert policy.parse("git", quote("https://lab.uni.example/r.git", safe="") + "/main")
    with pytest.raises(BadLink, match="not allowed here"):
        policy.parse("gh", "org/repo/main")  # github.com is not in this deployment's list


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ({"urlpath": "lab/tree/index.ipynb"}, "lab/tree/index.ipynb"),
        ({"urlpath": "/voila/render/a.ipynb?x=1"}, "voila/render/a.ipynb?x=1"),
        ({"labpath": "notebooks/a.ipynb"}, "doc/tree/notebooks/a.ipynb"),
        ({"filepath": "/data/b.csv"}, "tree/data/b.csv"),
        ({"urlpath": "lab/../../../hub/admin"}, "hub/admin"),  # stays relative to the server
        ({}, ""),
    ],
)  # fmt: skip
def test_launch_path(query, path):
    assert launch_path(**query) == path


@pytest.mark.parametrize("urlpath", ["//evil.example/x", "https://evil.example/", "\\\\evil"])
def test_launch_path_is_no_open_redirect(urlpath):
    with pytest.raises(BadLink):
        launch_path(urlpath=urlpath)


# -- refs against a real git server ---------------------------------------------------------
def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def served_repo(tmp_path_factory):
    """A repository with a branch, a lightweight and an annotated tag, served over dumb
    HTTP on loopback: (its URL, the commits by name)."""
    root = tmp_path_factory.mktemp("git")
    work = root / "work"
    work.mkdir()
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.org"]
    git("init", "-q", "-b", "main", cwd=work)
    (work / "requirements.txt").write_text("numpy\n")
    git(*ident, "add", ".", cwd=work)
    git(*ident, "commit", "-q", "-m", "one", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    git(*ident, "tag", "-a", "v1", "-m", "first release", cwd=work)
    git("tag", "light", cwd=work)
    (work / "extra.txt").write_text("x\n")
    git(*ident, "add", ".", cwd=work)
    git(*ident, "commit", "-q", "-m", "two", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    git("branch", "old", first, cwd=work)
    served = root / "served"
    served.mkdir()
    git("clone", "-q", "--bare", str(work), str(served / "repo.git"), cwd=root)
    git("update-server-info", cwd=served / "repo.git")
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/repo.git", {"main": second, "old": first, "v1": first,
                                                  "light": first, "HEAD": second}  # fmt: skip
    server.shutdown()


LOCAL = LinkPolicy(allowed_hosts=["127.0.0.1"])


def link_to(url: str, ref: str):
    return LOCAL.parse("git", f"{quote(url, safe='')}/{quote(ref, safe='')}")


@pytest.mark.parametrize("ref", ["main", "old", "v1", "light", "HEAD"])
async def test_refs_resolve_to_commits(served_repo, ref):
    url, commits = served_repo
    assert await resolve(link_to(url, ref)) == commits[ref]


async def test_a_commit_is_taken_as_it_is(served_repo):
    url, commits = served_repo
    assert await resolve(link_to(url, commits["old"])) == commits["old"]


async def test_a_missing_ref_and_an_unreachable_host_say_so(served_repo):
    url, _ = served_repo
    with pytest.raises(BadLink) as error:
        await resolve(link_to(url, "no-such-branch"))
    assert error.value.reason == "unresolvable-ref" and "no-such-branch" in str(error.value)
    nobody = f"http://127.0.0.1:{free_port()}/repo.git"
    with pytest.raises(BadLink) as error:
        await resolve(link_to(nobody, "main"), timeout=20)
    assert error.value.reason == "unreachable"


async def test_resolving_runs_no_command_from_the_link(tmp_path: Path):
    """git's ext:: transport runs a command; the policy refuses it, and git itself is
    told to allow only http(s) and git even if a URL got through."""
    marker = tmp_path / "pwned"
    with pytest.raises(BadLink):
        link_to(f"ext::sh -c 'touch {marker}'", "main")
    from sandbox_spawner.binder.links import RepoLink

    forged = RepoLink("git", f"ext::sh -c 'touch {marker}'", "main", "forged")
    with pytest.raises(BadLink):
        await resolve(forged, timeout=20)
    await asyncio.sleep(0.2)
    assert not marker.exists()


# -- git goes nowhere but where the link says ------------------------------------------------
class _Recording(http.server.SimpleHTTPRequestHandler):
    """Serves its directory; every request's path goes to ``server.seen``."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def do_POST(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        self.send_error(405)


class _Redirecting(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``server.code``, to the same path at ``server.target``."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(self.server.code)  # type: ignore[attr-defined]
        self.send_header("Location", self.server.target + self.path)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET


def _listen(address: str, handler, **attributes) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _close(server: http.server.ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A repository served twice over dumb HTTP: at 127.0.0.1 (the allowed host) and at
    127.0.0.2 ("elsewhere": any loopback address is this machine; it stands for the Hub's
    API, another service of the host, a cloud's metadata address), which notes every
    request it gets."""
    from binder_fixtures import git_repo

    root = tmp_path_factory.mktemp("elsewhere")
    commit = git_repo(root, "repo", {"requirements.txt": "numpy\n"})
    shutil.rmtree(root / "repo-work")
    served = functools.partial(_Recording, directory=str(root))
    allowed, target = _listen("127.0.0.1", served, seen=[]), _listen("127.0.0.2", served, seen=[])
    yield SimpleNamespace(root=root, commit=commit, target=target,
                          allowed_url=f"http://127.0.0.1:{allowed.server_address[1]}",
                          target_url=f"http://127.0.0.2:{target.server_address[1]}")  # fmt: skip
    _close(allowed)
    _close(target)


@pytest.fixture
def target_seen(elsewhere) -> list[str]:
    """What reaches the address off the allowlist during the test."""
    elsewhere.target.seen.clear()
    return elsewhere.target.seen


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_git_follows_no_redirect_off_the_allowlist(elsewhere, target_seen, tmp_path, code):
    """The repository's host is allowed and answers with a redirect to another host: git
    followed it (for its first request, the rest of the clone then went there too), cloned
    from there and launched; its last error line, from the other host, came back on the
    launch page. Now nothing reaches the other host and the launch says why."""
    from sandbox_spawner.binder.refs import fetch

    redirecting = _listen("127.0.0.1", _Redirecting, code=code, target=elsewhere.target_url)
    link = link_to(f"http://127.0.0.1:{redirecting.server_address[1]}/repo.git", "main")
    outcomes = []
    try:
        for step in (resolve(link, timeout=20),
                     fetch(link, elsewhere.commit, tmp_path / "checkout", timeout=20)):  # fmt: skip
            try:
                outcomes.append(f"went ahead: {await step}")
            except BadLink as exc:
                outcomes.append(exc)
    finally:
        _close(redirecting)
    assert target_seen == [], (outcomes, target_seen)
    for outcome in outcomes:
        assert isinstance(outcome, BadLink) and outcome.reason == "unreachable", outcome
        assert f"redirect (HTTP {code})" in str(outcome) and "127.0.0.2" not in str(outcome)
    assert not (tmp_path / "checkout").exists()


async def test_git_takes_no_alternates_off_the_allowlist(elsewhere, target_seen, tmp_path):
    """Dumb HTTP's ``objects/info/http-alternates`` names another place to take objects
    from: a redirect by another name (git follows one only when redirects are followed)."""
    from sandbox_spawner.binder.refs import fetch

    near = tmp_path / "near"
    shutil.copytree(elsewhere.root / "repo.git", near / "repo.git")
    objects = near / "repo.git" / "objects"
    for part in objects.iterdir():
        if part.name not in ("info", "pack"):
            shutil.rmtree(part)
    (objects / "info" / "http-alternates").write_text(f"{elsewhere.target_url}/repo.git/objects\n")
    served = _listen("127.0.0.1", functools.partial(_Recording, directory=str(near)), seen=[])
    link = link_to(f"http://127.0.0.1:{served.server_address[1]}/repo.git", "main")
    try:
        with pytest.raises(BadLink):
            await fetch(link, elsewhere.commit, tmp_path / "checkout", timeout=20)
    finally:
        _close(served)
    assert target_seen == [] and served.seen, (target_seen, served.seen)


#: Where the service's git could find configuration: url.<base>.insteadOf there rewrites
#: the allowed URL to another host (as http.proxy, http.followRedirects and others could
#: change where it goes).
CONFIG_SOURCES = ["working-directory", "GIT_DIR", "HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL",
                  "GIT_CONFIG_SYSTEM", "GIT_CONFIG_COUNT", "GIT_CONFIG_PARAMETERS"]  # fmt: skip


@pytest.mark.parametrize("source", CONFIG_SOURCES)
async def test_git_takes_no_configuration_from_the_services_environment(
    elsewhere, target_seen, tmp_path, monkeypatch, source
):
    """The service's own environment (its working directory, variables, home) is no
    user's, but nothing of it decides where git goes: only the link does."""
    from sandbox_spawner.binder.refs import fetch

    key, value = f"url.{elsewhere.target_url}/.insteadOf", f"{elsewhere.allowed_url}/"
    config = tmp_path / "gitconfig"
    git("config", "-f", str(config), key, value, cwd=tmp_path)
    if source in ("working-directory", "GIT_DIR"):
        repo = tmp_path / "service-cwd"
        git("init", "-q", str(repo), cwd=tmp_path)
        git("config", key, value, cwd=repo)
        if source == "GIT_DIR":
            monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
        else:
            monkeypatch.chdir(repo)
    elif source == "HOME":
        (tmp_path / "home").mkdir()
        shutil.copy(config, tmp_path / "home" / ".gitconfig")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    elif source == "XDG_CONFIG_HOME":
        (tmp_path / "xdg" / "git").mkdir(parents=True)
        shutil.copy(config, tmp_path / "xdg" / "git" / "config")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    elif source in ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM"):
        monkeypatch.setenv(source, str(config))
    elif source == "GIT_CONFIG_COUNT":
        for name, setting in (("COUNT", "1"), ("KEY_0", key), ("VALUE_0", value)):
            monkeypatch.setenv(f"GIT_CONFIG_{name}", setting)
    else:
        monkeypatch.setenv("GIT_CONFIG_PARAMETERS", f"'{key}'='{value}'")
    url = f"{elsewhere.allowed_url}/repo.git"
    # The attack works on a git left to its environment: it goes to the other host.
    plain = subprocess.run(["git", "ls-remote", url], capture_output=True, text=True)
    assert plain.returncode == 0 and target_seen, (plain.stderr, target_seen)
    target_seen.clear()
    link = link_to(url, "main")
    assert await resolve(link, timeout=20) == elsewhere.commit
    into = await fetch(link, elsewhere.commit, tmp_path / "checkout", timeout=20)
    assert (into / "requirements.txt").read_text() == "numpy\n"
    assert target_seen == [], target_seen


# -- the repository's environment ------------------------------------------------------------
def make(tree: dict[str, str], root: Path) -> Path:
    for name, text in tree.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_binder_dir_first_then_root(tmp_path: Path):
    from sandbox_spawner.binder.environment import read_environment

    repo = make({"requirements.txt": "pandas\n", "binder/requirements.txt": "numpy  # why\n",
                 "binder/postBuild": "#!/bin/sh\n", "binder/start": "#!/bin/sh\n"},
                tmp_path)  # fmt: skip
    env = read_environment(repo, installed=set())
    assert env.config_dir == repo / "binder"
    assert env.requirements == ["numpy"]  # the root's file is not read
    assert env.post_build == repo / "binder/postBuild" and env.start == repo / "binder/start"
    assert env.unsupported == []
    root_only = make({"requirements.txt": "pandas\n"}, tmp_path / "other")
    assert read_environment(root_only, installed=set()).requirements == ["pandas"]


def test_what_is_not_prepared_is_named(tmp_path: Path):
    import sys

    from sandbox_spawner.binder.environment import read_environment

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    repo = make({
        ".binder/environment.yml": "dependencies:\n  - python=" + here + "\n  - numpy\n"
                                   "  - pip:\n    - requests==2.*\n",
        ".binder/apt.txt": "coreutils\nno-such-package-here\n",
        ".binder/Dockerfile": "FROM scratch\n",
        ".binder/runtime.txt": "python-2.7\n",  # beside environment.yml: ignored, as upstream
    }, tmp_path)  # fmt: skip
    env = read_environment(repo, installed={"coreutils"})
    assert env.requirements == ["requests==2.*"] and env.python == here
    assert env.apt_packages == ["coreutils"]
    text = "\n".join(env.unsupported)
    assert "conda package 'numpy'" in text and "no-such-package-here" in text
    assert "Dockerfile: not supported" in text and "2.7" not in text


def test_contradictions_and_links_out_of_the_repository_are_refused(tmp_path: Path):
    from sandbox_spawner.binder.environment import BadRepository, read_environment

    both = make({"binder/requirements.txt": "a\n", ".binder/requirements.txt": "b\n"},
                tmp_path / "both")  # fmt: skip
    with pytest.raises(BadRepository, match=r"both binder/ and \.binder/"):
        read_environment(both, installed=set())
    leaky = make({"binder/postBuild": "#!/bin/sh\n"}, tmp_path / "leaky")
    (leaky / "binder/requirements.txt").symlink_to("/etc/passwd")
    with pytest.raises(BadRepository, match="symbolic link"):
        read_environment(leaky, installed=set())
    bad_yaml = make({"environment.yml": "dependencies: [\n"}, tmp_path / "yaml")
    with pytest.raises(BadRepository, match="not valid YAML"):
        read_environment(bad_yaml, installed=set())


def test_configuration_is_read_without_following_links(tmp_path: Path):
    """A fetched repository may hold links: no configuration file is read through one, not
    even to see whether it exists (the launch page said "Dockerfile: not supported" only
    when its link led to a file of the machine preparing the environment), and none is
    read past a bound."""
    from sandbox_spawner.binder.environment import BadRepository, read_environment

    said = []
    for target in ("/etc/passwd", "/nonexistent"):
        repo = make({"requirements.txt": "numpy\n"}, tmp_path / target.strip("/"))
        (repo / "Dockerfile").symlink_to(target)
        said.append(read_environment(repo, installed=set()).unsupported)
    assert said[0] == said[1] == ["Dockerfile: not supported (only requirements.txt, "
                                  "environment.yml's pip part, runtime.txt, apt.txt, postBuild "
                                  "and start are)"], said  # fmt: skip
    large = make({"binder/requirements.txt": "x\n" * (1 << 20)}, tmp_path / "large")
    with pytest.raises(BadRepository, match="larger than"):
        read_environment(large, installed=set())
    linked_dir = make({"real/requirements.txt": "numpy\n"}, tmp_path / "linked-dir")
    (linked_dir / "binder").symlink_to(linked_dir / "real")
    with pytest.raises(BadRepository, match="binder is a symbolic link"):
        read_environment(linked_dir, installed=set())


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path: Path):
    """420 bytes of nested aliases (billion laughs): the reader wrote the one dependency out
    with repr into a message, ~140 MiB, kept in prepared.json and sent to the launch page."""
    import time

    from binder_fixtures import alias_bomb

    from sandbox_spawner.binder.environment import BadRepository, read_environment

    repo = make({"environment.yml": alias_bomb()}, tmp_path)
    began = time.monotonic()
    try:
        env = read_environment(repo, installed=set())
        outcome: object = f"read: {sum(map(len, env.unsupported))} characters of messages"
    except BadRepository as exc:
        outcome = exc
    took = time.monotonic() - began
    assert isinstance(outcome, BadRepository), (outcome, f"{took:.1f}s")
    assert "alias" in str(outcome) and len(str(outcome)) < 500, outcome
    assert took < 1.0, took
    merged = make({"environment.yml": "base: &b {dependencies: [numpy]}\nmerged:\n  <<: *b\n"},
                  tmp_path / "merge")  # fmt: skip
    with pytest.raises(BadRepository, match="alias"):  # a merge key needs an alias too
        read_environment(merged, installed=set())


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("dependencies:\n  - [numpy, scipy]\n", "a string"),
        ("dependencies:\n  - {conda: numpy}\n", "a string"),
        ("dependencies:\n  - 3.11\n", "a string"),
        ("dependencies:\n  - pip: [requests, 2.0]\n", "strings"),
        ("dependencies:\n  - pip: requests\n", "strings"),
        ("dependencies:\n  - pip: [requests]\n    conda: [numpy]\n", "a string"),
        ("dependencies: numpy\n", "a list"),
        ("dependencies:\n  - numpy" + "x" * 100_000 + "\n", "characters"),
        ("dependencies:\n  - pip:\n    - requests" + "x" * 100_000 + "\n", "characters"),
        ("dependencies:\n" + "  - x\n" * 20_000, "dependencies"),
        ("dependencies:\n  - pip:\n" + "    - x\n" * 20_000, "requirements"),
        ("dependencies: " + "[" * 5000 + "]" * 5000 + "\n", "deep"),
    ],
    ids=["list", "mapping", "number", "pip-number", "pip-string", "pip-and-more", "not-a-list",
         "long", "pip-long", "many", "pip-many", "nested"],
)  # fmt: skip
def test_conda_dependencies_are_strings_bounded_in_length_and_number(tmp_path: Path, text, why):
    """Only strings, or ``pip:`` with a list of strings; each of a bounded length, a bounded
    number of them, nested to a bounded depth: else the repository is refused, saying why
    (before, anything was taken, written out with ``repr``/``str``)."""
    from sandbox_spawner.binder.environment import BadRepository, read_environment

    repo = make({"environment.yml": text}, tmp_path)
    with pytest.raises(BadRepository, match=why) as error:
        read_environment(repo, installed=set())
    assert str(error.value).startswith("environment.yml") and len(str(error.value)) < 500


def test_requirements_are_bounded_and_plain(tmp_path: Path):
    from sandbox_spawner.binder.environment import BadRepository, read_environment

    for text, why in (("x\n" * 50_000, "requirements"), ("numpy" + "x" * 100_000, "characters"),
                      ("numpy\x1b[2J\n", "control character")):  # fmt: skip
        repo = make({"requirements.txt": text}, tmp_path / why.replace(" ", "-"))
        with pytest.raises(BadRepository, match=why) as error:
            read_environment(repo, installed=set())
        assert str(error.value).startswith("requirements.txt") and len(str(error.value)) < 500
    # What real repositories write passes: a long pinned list, hashes, URLs.
    pinned = "".join(f"package{i}==1.{i} --hash=sha256:{'a' * 64}\n" for i in range(3000))
    repo = make({"requirements.txt": pinned, "environment.yml": "dependencies:\n  - pip:\n"
                 "    - demo @ https://example.org/demo-1.0-py3-none-any.whl\n"},
                tmp_path / "pinned")  # fmt: skip
    assert len(read_environment(repo, installed=set()).requirements) == 3001


def test_what_is_kept_from_a_repository_is_bounded(tmp_path: Path):
    """What is not prepared is said on the launch page and kept in prepared.json: a message
    per conda package, and every name of apt.txt and runtime.txt in full, made both as
    large as the files (1 MiB each)."""
    from sandbox_spawner.binder.environment import read_environment

    repo = make({
        "binder/environment.yml": "dependencies:\n" + f"  - conda-{'c' * 80}\n" * 9000,
        "binder/apt.txt": f"Not-A-Name-{'a' * 80}\n" * 6000 + f"missing-{'m' * 80}\n" * 2000,
        "binder/Dockerfile": "FROM scratch\n",
    }, tmp_path)  # fmt: skip
    env = read_environment(repo, installed=set())
    said = "\n".join(env.unsupported)
    assert len(env.unsupported) <= 10 and len(said) < 16_000, (len(env.unsupported), len(said))
    assert "and 8990 more" in said and "and 5990 more" in said, said  # how many is still said
    runtime = make({"runtime.txt": "python-" + "9" * 500_000}, tmp_path / "runtime")
    said = read_environment(runtime, installed=set()).unsupported
    assert len(said) == 1 and len(said[0]) < 1000, len(said[0])


def test_a_launch_without_login_counts_against_the_address_the_proxy_saw():
    """X-Forwarded-For is read only from a trusted proxy, and only what the proxies
    appended: what the client wrote in front is not believed."""
    from sandbox_spawner.binder.admission import ClientRate, client_of, networks

    proxies = networks(["127.0.0.1", "10.0.0.0/8"])
    assert client_of("127.0.0.1", "203.0.113.9, 198.51.100.7", proxies) == "198.51.100.7"
    assert client_of("127.0.0.1", "203.0.113.9, 10.1.2.3", proxies) == "203.0.113.9"  # 2 hops
    assert client_of("198.51.100.7", "127.0.0.9", proxies) == "198.51.100.7"  # not the proxy
    assert client_of("127.0.0.1", None, proxies) == "127.0.0.1"
    assert client_of("127.0.0.1", "no address, 127.0.0.1", proxies) == "127.0.0.1"
    assert client_of("::ffff:198.51.100.7", None, proxies) == "198.51.100.7"
    assert client_of("127.0.0.1", "2001:db8::1", proxies) == "2001:db8::/64"
    assert client_of("127.0.0.1", "[2001:db8::ffff]", proxies) == "2001:db8::/64"
    rate = ClientRate(2, 60)
    assert [rate.allow("a", now=t) for t in (0, 1, 2)] == [True, True, False]
    assert rate.allow("b", now=2) and rate.allow("a", now=61)
    assert all(ClientRate(0, 60).allow("a") for _ in range(100))  # 0: no limit


async def test_fetch_checks_out_the_commit(served_repo, tmp_path: Path):
    from sandbox_spawner.binder.refs import fetch

    url, commits = served_repo
    into = await fetch(link_to(url, "old"), commits["old"], tmp_path / "checkout")
    assert git("rev-parse", "HEAD", cwd=into) == commits["old"]
    assert (into / "requirements.txt").read_text() == "numpy\n"
    assert not (into / "extra.txt").exists()  # added by the later commit
    with pytest.raises(BadLink) as error:
        await fetch(link_to(url, "main"), "0" * 40, tmp_path / "missing")
    assert error.value.reason == "unresolvable-ref"


def test_this_repositorys_own_binder_dir(tmp_path: Path):
    """The examples are launchable: binder/ asks for what they import and nothing this
    project does not prepare; postBuild (for repo2docker) stands aside in a preparation."""
    import os

    from sandbox_spawner.binder.environment import read_environment

    repo = Path(__file__).resolve().parent.parent
    env = read_environment(repo, installed={"bubblewrap"})
    assert env.config_dir == repo / "binder"
    assert sorted(r.split(">=")[0] for r in env.requirements) == ["matplotlib", "numpy"]
    assert env.unsupported == [] and env.post_build is not None
    ran = subprocess.run([str(env.post_build)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "JUPYTER_SANDBOX_PREPARE": "1"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "" and not list(tmp_path.iterdir())


def test_binder_settings_are_variables_of_the_shipped_configurations():
    """JUPYTER_SANDBOX_BINDER_* become the service's options, which the service parses
    (a later option wins over the shipped default); unset ones change nothing."""
    import argparse

    from sandbox_spawner.binder.web import add_arguments, settings_arguments

    assert settings_arguments({}) == []
    args = settings_arguments({
        "JUPYTER_SANDBOX_BINDER_HOSTS": "github.com,gitlab.example.org",
        "JUPYTER_SANDBOX_BINDER_BASES": "gl=https://gitlab.example.org, gh=https://gh.example",
        "JUPYTER_SANDBOX_BINDER_INDEX": "https://pypi.example/simple",
        "JUPYTER_SANDBOX_BINDER_EGRESS": "files.example:443",
    })  # fmt: skip
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_argument_group())
    parsed = parser.parse_args(["--binder-allowed-hosts=github.com", *args])
    assert parsed.binder_allowed_hosts == "github.com,gitlab.example.org"
    assert parsed.binder_base == ["gl=https://gitlab.example.org", "gh=https://gh.example"]
    assert parsed.binder_index_url == "https://pypi.example/simple"
    assert parsed.binder_egress == "pypi.org,files.pythonhosted.org,files.example:443"


def test_a_refused_host_says_which_setting_to_change():
    with pytest.raises(BadLink, match="JUPYTER_SANDBOX_BINDER_HOSTS"):
        POLICY.parse("git", quote("https://elsewhere.example/r.git", safe="") + "/main")


@pytest.mark.parametrize("ref", ["x/../y", "..", ".hidden", "a/.b", "a#b", "a\x01b", "a\\b"])
def test_refs_that_a_url_would_read_as_a_path_are_refused(ref):
    with pytest.raises(BadLink) as error:
        POLICY.parse("gh", f"org/repo/{quote(ref, safe='')}")
    assert error.value.reason == "malformed", error.value


@pytest.mark.parametrize("url", ["https://evil.example\\@github.com/org/repo.git",
                                 "https://user:secret@github.com/org/repo.git",
                                 "https://github.com/org/re po.git",
                                 "https://github.com/org/re\x7fpo.git"])  # fmt: skip
def test_repository_urls_have_one_reading(url):
    """A host Python and git read one way and a browser another (a backslash), credentials,
    spaces and control characters: refused before the host is checked."""
    with pytest.raises(BadLink) as error:
        POLICY.parse("git", quote(url, safe="") + "/main")
    assert error.value.reason == "disallowed-host", error.value


def test_a_repositorys_page_is_made_of_its_checked_parts():
    link = POLICY.parse("gh", "jupyter/notebook/main")
    assert link.web_url == "https://github.com/jupyter/notebook"
    assert link.ref_url == "https://github.com/jupyter/notebook/tree/main"
    assert POLICY.parse("gh", "jupyter/notebook/HEAD").ref_url is None
