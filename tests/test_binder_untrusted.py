"""What a preparation or a user wrote, met by root: the attacks of the review of the Binder
links (issue 23), run for real. A repository served on loopback, its preparation in a real
bubblewrap or gVisor sandbox, the user's copy made by the real code the spawner calls; the
damage is looked for on the host (what root read, where a copy landed, who owns a file).

* a link (or a pipe, or junk) the preparation leaves as the environment's ``.site``;
* on Kubernetes, a preparation pod that replaces its log with a link;
* links in the user's home that would redirect the copy of the repository;
* a sparse file that fills no block and a flood of empty files, against the limits;
* ``apt.txt`` names that are options of ``dpkg-query``;
* an ``environment.yml`` of nested YAML aliases, and the record it made (``prepared.json``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from binder_fixtures import alias_bomb, events, git_repo, link, peak_rss, pod_preparer, preparer
from conftest import require_runtime

from sandbox_spawner.binder.prepare import PreparationFailed, PrepareLimits, Preparer, repo_key
from sandbox_spawner.binder.server import BadBinderOptions, BinderServer, from_user_options

RUNTIMES = ["bubblewrap", "gvisor"]
#: A uid no account has: the owner of the test's "user" home.
USER_UID = 1_990_000_000 + os.getpid() % 100_000


def root_only_secret(tmp_path: Path) -> tuple[Path, str]:
    """A file like the Hub's cookie secret: root's, mode 0600."""
    secret = secrets.token_hex(32)
    path = tmp_path / "jupyterhub_cookie_secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path, secret


def no_preparation_left(prep: Preparer) -> None:
    assert os.listdir(prep.cache_root / ".work") == []
    leftover = subprocess.run(["pgrep", "-f", "sandbox_spawner.binder.inside"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    assert leftover == []


# -- 1. the environment's .site, written in the sandbox, read by root --------------------------
SITE_ATTACKS = {
    # A link to a root-only file of the host: root read it into the server's PYTHONPATH.
    "link": "ln -sf {secret_path} /srv/binder/.site",
    # A named pipe: root's read of it waits for a writer, on the service's event loop.
    "fifo": "rm -f /srv/binder/.site && mkfifo /srv/binder/.site",
    # Content that is no relative path: PYTHONPATH gains host-like paths and separators.
    "path-list": "printf '../../../etc:/root' > /srv/binder/.site",
    "control": "printf 'lib\\033[2Jx' > /srv/binder/.site",
    "large": "head -c 2000000 /dev/zero | tr '\\0' a > /srv/binder/.site",
}


#: gVisor keeps a sandbox's named pipes in its own kernel: the host sees no pipe (the file is
#: just gone, and the default applies), so that attack is bubblewrap's only.
SITE_CASES = [(r, a) for r in RUNTIMES for a in SITE_ATTACKS if (r, a) != ("gvisor", "fifo")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("runtime", "attack"), SITE_CASES)
async def test_the_environments_site_file_is_input_not_a_path(served, tmp_path, runtime, attack):
    require_runtime(runtime)
    secret_path, secret = root_only_secret(tmp_path)
    name = f"site-{attack}-{runtime}"
    post_build = "#!/bin/sh\n" + SITE_ATTACKS[attack].format(secret_path=secret_path) + "\n"
    commit = git_repo(served["repos"], name, {"requirements.txt": "demo_pkg\n",
                                              "postBuild": post_build},
                      executable=("postBuild",))  # fmt: skip
    prep = preparer(served, tmp_path, runtime)
    seen, emit = events()
    try:
        prepared, _ = await prep.prepare(link(served, name), commit, emit)
    except PreparationFailed as exc:
        failure = str(exc)
    else:
        server = BinderServer(prepared, repo_key(link(served, name).url), False)
        pythonpath = server.env()["PYTHONPATH"]
        pytest.fail(f"prepared; the server's PYTHONPATH would be {pythonpath[:200]!r}"
                    + (" (the Hub's secret)" if secret in pythonpath else ""))  # fmt: skip
    assert ".site" in failure, failure
    assert secret not in failure and not any(secret in m for _, m in seen)
    assert prep.cached(link(served, name), commit) is None
    no_preparation_left(prep)


# -- 1 (Kubernetes). The preparation pod's log, on the shared volume -----------------------------
POD_LOG_LINK = """#!/bin/sh
echo before the swap
sleep 1
ln -sf {target} /var/log/binder/build.log
echo after the swap
sleep 3
echo done
"""


async def test_a_preparation_pods_log_link_is_not_followed(served, cluster, node_agent,
                                                           tmp_path):  # fmt: skip
    """The pod's log directory is writable by the pod (0777): the pod replaced its log with
    a link to a root-only file of the Hub's pod, and the service streamed that file to the
    launch page. (Here the service is this test's process, the pod runs on the test
    cluster's stand-in node.)"""
    secret_path = tmp_path / "service-token"
    secret = "SERVICE_TOKEN=" + secrets.token_hex(16)
    secret_path.write_text("#" * 4096 + "\n" + secret + "\n")  # past any offset the log had
    secret_path.chmod(0o600)
    async with pod_preparer(served, cluster) as (prep, _, _, cache_root):
        commit = git_repo(served["repos"], "pod-log-link", {
            "requirements.txt": "demo_pkg\n",
            "postBuild": POD_LOG_LINK.format(target=secret_path),
        }, executable=("postBuild",))  # fmt: skip
        seen, emit = events()
        try:
            await prep.prepare(link(served, "pod-log-link"), commit, emit)
        except PreparationFailed as exc:
            seen.append(("failed", str(exc)))
        log = "\n".join(m for _, m in seen)
        assert secret not in log, f"the service streamed {secret_path}:\n{log[-600:]}"
        # The pod's own output after the swap still reaches the page: the service reads the
        # file it opened, not whatever the name points at now.
        assert "after the swap" in log and "done" in log, log
        assert os.listdir(cache_root / ".work") == []


# -- 2. the user's copy, in a home the user writes ---------------------------------------------
POST_BUILD_FILES = """#!/bin/sh
set -e
echo mine > private.txt && chmod 600 private.txt
mkdir -p deep/er && echo x > deep/er/file.txt && chmod 700 deep
truncate -s 200M sparse.bin && echo tail >> sparse.bin
ln -s /etc/shadow escape
"""


def users_home(tmp_path: Path) -> Path:
    home = tmp_path / "homes" / "mallory"
    home.mkdir(parents=True, mode=0o700)
    os.chown(home, USER_UID, USER_UID)
    return home


def plant_link(target: Path, at: Path) -> None:
    """A link the user made (owned by the user, as one made by their server is)."""
    at.symlink_to(target)
    os.lchown(at, USER_UID, USER_UID)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_users_copy_never_goes_through_a_link_in_the_home(served, tmp_path, runtime):
    require_runtime(runtime)
    name = f"copy-{runtime}"
    commit = git_repo(served["repos"], name, {"requirements.txt": "demo_pkg\n",
                                              "postBuild": POST_BUILD_FILES},
                      executable=("postBuild",))  # fmt: skip
    prep = preparer(served, tmp_path, runtime)
    prepared, _ = await prep.prepare(link(served, name), commit, events()[1])
    key = repo_key(link(served, name).url)
    server = BinderServer(prepared, key, False)
    home = users_home(tmp_path)
    victim = tmp_path / "root-only"  # as /root: root's, mode 0700
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_text("root's\n")

    # ~/binder is a link to the root-only directory.
    plant_link(victim, home / "binder")
    try:
        made = await server.copy_for(home, USER_UID, USER_UID)
    except Exception as exc:  # what it is is asserted below
        refused: Exception | None = exc
    else:
        refused = None
    assert sorted(os.listdir(victim)) == ["shadow"], (
        f"the copy went through ~/binder into {victim}: {sorted(os.listdir(victim))}, "
        f"owners {[os.lstat(victim / n).st_uid for n in os.listdir(victim)]}")
    from sandbox_spawner.binder.server import CopyFailed

    assert isinstance(refused, CopyFailed) and "binder" in str(refused), refused
    assert (home / "binder").is_symlink()  # what the user made is left as it is

    # ~/binder/<key> is a link to it: never taken for the user's copy.
    (home / "binder").unlink()
    (home / "binder").mkdir()
    os.chown(home / "binder", USER_UID, USER_UID)
    plant_link(victim, home / "binder" / key)
    try:
        made = await server.copy_for(home, USER_UID, USER_UID)
    except CopyFailed as exc:
        assert key in str(exc) and "link" in str(exc), exc
    else:
        pytest.fail(f"copy_for gave {made} (a link to {os.readlink(made)}) as the user's copy")
    assert sorted(os.listdir(victim)) == ["shadow"] and (home / "binder" / key).is_symlink()

    # A file in its place is refused too, and kept.
    (home / "binder" / key).unlink()
    (home / "binder" / key).write_text("not a copy\n")
    with pytest.raises(CopyFailed, match="not a directory"):
        await server.copy_for(home, USER_UID, USER_UID)
    assert (home / "binder" / key).read_text() == "not a copy\n"

    # Without links: the copy, made as the user, sparse files sparse, links as links.
    (home / "binder" / key).unlink()
    made = await server.copy_for(home, USER_UID, USER_UID)
    assert made == home / "binder" / key and not made.is_symlink()
    for path in (made, *made.rglob("*")):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (USER_UID, USER_UID), path
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
    assert (made / "private.txt").read_text() == "mine\n"
    assert (made / "deep/er/file.txt").read_text() == "x\n"
    assert os.readlink(made / "escape") == "/etc/shadow"
    sparse = os.stat(made / "sparse.bin")
    assert sparse.st_size == (200 << 20) + 5 and sparse.st_blocks * 512 < 1 << 20, sparse
    assert (made / "sparse.bin").open("rb").read(4) == b"\0" * 4
    # Kept, with the user's changes, on the next launch.
    (made / "notes.txt").write_text("my notes\n")
    assert await server.copy_for(home, USER_UID, USER_UID) == made
    assert (made / "notes.txt").read_text() == "my notes\n"
    assert sorted(p.name for p in (home / "binder").iterdir()) == [key]  # no staging left
    shutil.rmtree(tmp_path / "homes")


@pytest.mark.timeout(60)
async def test_special_files_are_neither_kept_nor_opened(served, tmp_path):
    """A named pipe left in the repository made every launch's copy fail (shutil refuses to
    copy one); opened for reading it would wait for a writer."""
    require_runtime("bubblewrap")
    name = "fifo-in-repo"
    commit = git_repo(served["repos"], name, {
        "requirements.txt": "demo_pkg\n",
        "postBuild": "#!/bin/sh\nmkfifo pipe\nmkdir sub\nmkfifo sub/pipe\necho kept > kept.txt\n",
    }, executable=("postBuild",))  # fmt: skip
    prep = preparer(served, tmp_path, "bubblewrap")
    prepared, _ = await prep.prepare(link(served, name), commit, events()[1])
    server = BinderServer(prepared, repo_key(link(served, name).url), False)
    made = await server.copy_for(users_home(tmp_path), USER_UID, USER_UID)
    assert (made / "kept.txt").read_text() == "kept\n"
    assert not (made / "pipe").exists() and not (made / "sub" / "pipe").exists()
    assert not (prepared.repo / "pipe").exists()  # not kept in the prepared commit either


# -- 3. disk: apparent sizes, file counts ------------------------------------------------------
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_sparse_file_counts_its_apparent_size(served, tmp_path, runtime):
    """``truncate -s 3G`` allocates no block: counted by blocks it passed any limit, and
    its copy into a home wrote 3 GiB."""
    require_runtime(runtime)
    name = f"sparse-{runtime}"
    commit = git_repo(served["repos"], name, {
        "requirements.txt": "demo_pkg\n", "postBuild": "#!/bin/sh\ntruncate -s 3G big.bin\n",
    }, executable=("postBuild",))  # fmt: skip
    prep = preparer(served, tmp_path, runtime, disk_bytes=20 << 20)
    _, emit = events()
    with pytest.raises(PreparationFailed, match="more than 20 MiB of disk"):
        await prep.prepare(link(served, name), commit, emit)
    assert prep.cached(link(served, name), commit) is None
    no_preparation_left(prep)


async def test_a_flood_of_empty_files_is_limited(served, tmp_path):
    require_runtime("bubblewrap")
    name = "many-files"
    commit = git_repo(served["repos"], name, {
        "requirements.txt": "demo_pkg\n",
        "postBuild": "#!/bin/sh\nmkdir many && cd many && seq 1 3000 | xargs touch\n",
    }, executable=("postBuild",))  # fmt: skip
    prep = Preparer(tmp_path / "cache", runtime="bubblewrap", egress=(),
                    index_url=f"{served['index'].url}/simple/",
                    limits=PrepareLimits(timeout=120, files=1000))  # fmt: skip
    _, emit = events()
    with pytest.raises(PreparationFailed, match="more than 1000 files"):
        await prep.prepare(link(served, name), commit, emit)
    no_preparation_left(prep)


# -- 4b. apt.txt ------------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_apt_names_never_reach_dpkg_query_as_options(served, tmp_path, runtime):
    """The first name was an option of dpkg-query: it changed the output format and made a
    missing package look installed (and an installed one missing)."""
    require_runtime(runtime)
    name = f"apt-{runtime}"
    apt = "--showformat=no-such-pkg-xyz installed\\n\ncoreutils\nno-such-pkg-xyz\n"
    commit = git_repo(served["repos"], name, {"requirements.txt": "demo_pkg\n",
                                              "apt.txt": apt})  # fmt: skip
    prep = preparer(served, tmp_path, runtime)
    seen, emit = events()
    prepared, _ = await prep.prepare(link(served, name), commit, emit)
    said = [m for _, m in seen if m.startswith("Not prepared: apt.txt")]
    unsupported = [u for u in prepared.record["unsupported"] if u.startswith("apt.txt")]
    assert any("no-such-pkg-xyz not installed" in u for u in unsupported), unsupported
    assert not any("coreutils" in u for u in unsupported), unsupported
    assert any("--showformat" in u and "not a Debian package name" in u
               for u in unsupported), unsupported  # fmt: skip
    assert len(said) == len(unsupported)


# -- 5. YAML aliases, and the record of a prepared commit ------------------------------------
async def test_a_yaml_alias_bomb_is_refused_at_once(served, tmp_path):
    """420 bytes of nested aliases in environment.yml: the service wrote the dependency out
    with ``repr`` (~140 MiB) into a message for the launch page and into prepared.json; in
    the service, 88 MiB of memory became 883 MiB and its pages stalled for seconds. Measured
    here on this process, which runs the service's code."""
    import time

    name = "alias-bomb"
    commit = git_repo(served["repos"], name, {"environment.yml": alias_bomb()})
    prep = preparer(served, tmp_path, "bubblewrap")
    seen, emit = events()
    before = peak_rss(reset=True)
    began = time.monotonic()
    try:
        prepared, _ = await prep.prepare(link(served, name), commit, emit)
        size = (prepared.path / "prepared.json").stat().st_size
        outcome: object = f"prepared: its prepared.json has {size >> 20} MiB"
    except PreparationFailed as exc:
        outcome = exc
    took, grew = time.monotonic() - began, peak_rss() - before
    said = sum(len(message) for _, message in seen)
    evidence = f"{outcome}; {took:.1f}s, memory +{grew >> 20} MiB, {said} characters said"
    print(evidence)
    assert isinstance(outcome, PreparationFailed) and "alias" in str(outcome), evidence
    assert took < 5 and grew < 32 << 20 and said < 4096, evidence
    assert prep.cached(link(served, name), commit) is None
    no_preparation_left(prep)


async def test_an_oversized_record_is_refused_by_load(tmp_path):
    """prepared.json was read whole, with no bound, by the Hub at every start of a server of
    that commit (on its event loop: 6.5 s for the 154 MiB an alias bomb made) and by the
    service at every launch. A record past the bound is refused now, at once and saying
    why; so is one that is no regular file."""
    import json
    import time

    from sandbox_spawner.binder.links import RepoLink

    cache = tmp_path / "cache"
    link = RepoLink("git", "http://127.0.0.1:1/repo.git", "main", "spec")
    commit = "a" * 40
    prep = Preparer(cache)
    entry = prep.entry(link, commit)
    for sub in ("repo", "env"):
        (entry / sub).mkdir(parents=True)
    record = {"url": link.url, "commit": commit, "requirements": [], "site": "lib",
              "start": None, "post_build": False, "unsupported": ["x" * (64 << 20)]}  # fmt: skip
    (entry / "prepared.json").write_text(json.dumps(record))
    options = {"binder": {"repo": entry.parent.name, "commit": commit}}
    began = time.monotonic()
    try:
        outcome: object = f"loaded: {from_user_options(options, cache)}"[:200]
    except BadBinderOptions as exc:
        outcome = exc
    took = time.monotonic() - began
    print(f"{outcome} ({took:.3f}s)")
    assert isinstance(outcome, BadBinderOptions) and "record" in str(outcome), outcome
    assert took < 0.5, took
    with pytest.raises(PreparationFailed, match="record"):  # the service's launch
        await prep.prepare(link, commit, events()[1])
    (entry / "prepared.json").unlink()
    (entry / "prepared.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps({**record, "unsupported": []}))
    with pytest.raises(BadBinderOptions, match="record"):
        from_user_options(options, cache)
