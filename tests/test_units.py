"""Pure logic: sizes, mount plans, environment filtering, the seccomp filter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sandbox_provisioner import filesystem
from sandbox_provisioner.limits import parse_size
from sandbox_provisioner.pyenv import minimal_cover, python_dirs
from sandbox_provisioner.runtimes.gvisor import _release_date
from sandbox_provisioner.seccomp import filter_bpf
from sandbox_provisioner.spec import MountKind


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("100", 100), (4096, 4096),
     (0, None), ("", None), (None, None), ("64k", 64 << 10)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2X", "-1G", True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_extra_mount_parsing(tmp_path: Path):
    m = filesystem.ExtraMount.parse(f"{tmp_path}:/data:rw")
    assert (m.source, m.target, m.writable) == (str(tmp_path), "/data", True)
    m = filesystem.ExtraMount.parse(str(tmp_path))
    assert (m.target, m.writable) == (str(tmp_path), False)
    for bad in ["", f"{tmp_path}:data", "/no/such:/x", f"{tmp_path}:/a:/b:/c"]:
        with pytest.raises(ValueError):
            filesystem.ExtraMount.parse(bad)


def test_python_dirs_come_from_the_interpreter():
    dirs = python_dirs(sys.executable)
    assert os.path.realpath(sys.prefix) in dirs
    assert all(os.path.isabs(d) and os.path.exists(d) for d in dirs)
    assert os.getcwd() not in dirs or os.getcwd() in (sys.prefix, "/")


def test_minimal_cover():
    assert minimal_cover(["/a/b", "/a", "/c/d", "/ab"]) == ["/a", "/ab", "/c/d"]


def test_mount_plan(tmp_path: Path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".netrc").write_text("secret")
    (home / ".venv").mkdir()
    (home / ".git").mkdir()
    ipc = tmp_path / "state" / "ipc"
    ipc.mkdir(parents=True)
    conn = tmp_path / "kernel.json"
    conn.write_text("{}")
    mounts = filesystem.build_mounts(
        python_paths=[str(home / ".venv"), "/usr/lib/python3"],
        workspace=str(home),
        workspace_writable=True,
        scratch_dir=None,
        ipc_dir=str(ipc),
        connection_file=str(conn),
        etc_mounts=[],
        hidden_paths=(str(home / ".*"),),
    )
    by_target = {m.target: m for m in mounts}
    assert [m.depth for m in mounts] == sorted(m.depth for m in mounts)  # parents first
    assert by_target[str(home)].writable
    assert by_target[str(home / ".ssh")].kind is MountKind.TMPFS
    assert by_target[str(home / ".netrc")].kind is MountKind.HIDE_FILE
    # The Python environment under a hidden path stays visible, read-only.
    venv = by_target[str(home / ".venv")]
    assert venv.kind is MountKind.BIND and not venv.writable
    assert by_target[str(home / ".git")].kind is MountKind.BIND
    assert not by_target[str(home / ".git")].writable
    assert by_target[str(ipc)].writable and not by_target[str(conn)].writable
    assert by_target["/usr"].source == "/usr" and not by_target["/usr"].writable
    assert "/usr/lib/python3" not in by_target  # covered by /usr
    assert by_target["/tmp"].kind is MountKind.TMPFS
    assert not any(m.target.startswith("/etc/shadow") for m in mounts)


def test_a_pooled_kernels_plan_binds_again_what_its_workspace_covers(tmp_path: Path):
    """A member booted with the kernel's Python environment read-only; the kernel's
    workspace holds it. Bound over it, the workspace would make it writable: the plan
    binds it again after, and leaves alone what the workspace does not cover."""
    from sandbox_provisioner.pool import STAGE_RO_TARGET, stage_plan
    from sandbox_provisioner.spec import Mount

    workspace, other = tmp_path / "project", tmp_path / "other"
    env = workspace / ".venv"
    for d in (env, other):
        d.mkdir(parents=True)
    member = [Mount("/usr", source="/usr"), Mount(str(env), source=str(env)),
              Mount(str(other), source=str(other))]  # fmt: skip
    kernel = [Mount("/usr", source="/usr"), Mount(str(workspace), source=str(workspace),
              writable=True), Mount(str(env), source=str(env)),
              Mount(str(other), source=str(other))]  # fmt: skip
    plan = stage_plan(kernel, member, str(tmp_path), check_inodes=False)
    assert plan is not None
    assert [(step["target"], step["writable"]) for step in plan] == [
        (str(workspace), True), (str(env), False)]  # fmt: skip
    assert plan[1]["source"] == f"{STAGE_RO_TARGET}/project/.venv"


def test_the_plan_protects_every_repository_in_the_workspace(tmp_path: Path):
    """Repositories at any depth, of every shape, are read-only; the walk that finds
    them follows no link out, and enters neither a hidden directory nor the Python
    environment in the workspace (read-only as a whole already)."""
    ws = tmp_path / "ws"
    for d in ("a/b/c/.git/hooks", "a/.hg", "deep/x/y/bare/objects", "deep/x/y/bare/refs",
              "notbare/objects", "notbare/refs", "secret/.git", "linked/.git",
              ".venv/lib/pkg/.git", "dotgit-file"):  # fmt: skip
        (ws / d).mkdir(parents=True)
    (ws / "deep/x/y/bare/HEAD").write_text("ref: refs/heads/main\n")
    (ws / "dotgit-file/.git").write_text("gitdir: ../a/b/c/.git\n")
    (ws / "link-to-dir").mkdir()
    (ws / "link-to-dir/.git").symlink_to(ws / "linked/.git")
    (ws / "gitdirs/proj").mkdir(parents=True)  # as the ``repo`` tool lays them out
    (ws / "checkout").mkdir()
    (ws / "checkout/.git").symlink_to("../gitdirs/proj")
    (ws / "link-to-file").mkdir()
    (ws / "link-to-file/.git").symlink_to(ws / "dotgit-file/.git")
    (tmp_path / "outside/.git").mkdir(parents=True)
    (ws / "link-out").symlink_to(tmp_path / "outside")
    mounts = filesystem.build_mounts(
        python_paths=[str(ws / ".venv")], workspace=str(ws), workspace_writable=True,
        scratch_dir=None, ipc_dir=None, connection_file=None, etc_mounts=[],
        hidden_paths=(str(ws / "secret"),),
    )  # fmt: skip
    by_target = {m.target: m for m in mounts}
    # A link is protected where it leads (a bind through a link would be refused).
    repositories = {"a/b/c/.git", "a/.hg", "deep/x/y/bare", "dotgit-file/.git",
                    "linked/.git", "gitdirs/proj"}  # fmt: skip
    for rel in repositories:
        m = by_target[str(ws / rel)]
        assert m.kind is MountKind.BIND and not m.writable and m.source == str(ws / rel), rel
    inside = {m.target[len(str(ws)) + 1 :] for m in mounts if m.target.startswith(f"{ws}/")}
    assert inside == repositories | {".venv", "secret"}, inside
    assert by_target[str(ws / "secret")].kind is MountKind.TMPFS
    assert not by_target[str(ws / ".venv")].writable


def test_the_plan_keeps_the_directories_on_path_read_only(tmp_path: Path, monkeypatch):
    """A home's ``bin`` (and a directory on the server's PATH) is read-only where it really
    is, never rebound writable with the home's other entries; ``.local/bin`` stays hidden
    with ``.local``; a PATH directory no bind shows gets no mount."""
    home = tmp_path / "home"
    for d in ("bin", ".local/bin", "other", "tools/bin", "dotfiles/bin"):
        (home / d).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (home / "linked").symlink_to("dotfiles/bin")
    monkeypatch.setenv("HOME", str(home))
    path = [home / "tools/bin", home / "linked", tmp_path / "elsewhere", "relative/bin"]
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, path)))
    mounts = filesystem.build_mounts(
        python_paths=[], workspace=str(home), workspace_writable=True, scratch_dir=None,
        ipc_dir=None, connection_file=None, etc_mounts=[],
    )  # fmt: skip
    inside = {m.target[len(str(home)) + 1 :]: m for m in mounts if m.target.startswith(f"{home}/")}
    for rel in ("bin", "tools/bin", "dotfiles/bin"):
        m = inside[rel]
        assert m.kind is MountKind.BIND and not m.writable and m.source == str(home / rel), rel
    assert inside["other"].writable and inside[".local"].kind is MountKind.TMPFS
    assert set(inside) == {"bin", "other", "tools", "tools/bin", "dotfiles", "dotfiles/bin",
                           ".local"}, inside  # fmt: skip
    assert not [m for m in mounts if m.target == str(tmp_path / "elsewhere")]


def test_scratch_workspace_plan(tmp_path: Path):
    mounts = filesystem.build_mounts(
        python_paths=[], workspace=None, workspace_writable=True, scratch_dir=str(tmp_path),
        ipc_dir=str(tmp_path), connection_file=str(tmp_path), etc_mounts=[],
    )  # fmt: skip
    scratch = next(m for m in mounts if m.target == filesystem.SCRATCH_TARGET)
    assert scratch.source == str(tmp_path) and scratch.writable


def test_synthetic_etc_has_only_the_sandbox_user(tmp_path: Path):
    mounts = filesystem.synthetic_etc(tmp_path, "sandbox", 65534, 65534)
    assert {m.target for m in mounts} == {"/etc/passwd", "/etc/group", "/etc/hosts",
                                          "/etc/hostname"}  # fmt: skip
    passwd = (tmp_path / "passwd").read_text()
    assert "sandbox:x:65534" in passwd and len(passwd.splitlines()) == 2


def test_seccomp_filter_compiles():
    program = filter_bpf()
    assert len(program) % 8 == 0 and len(program) > 200  # sock_filter entries are 8 bytes


@pytest.mark.parametrize(
    ("version", "date"),
    [("runsc version 0.0~20221219.0", 20221219), ("runsc version release-20240729.0", 20240729),
     ("runsc version dev", 0)],
)  # fmt: skip
def test_runsc_release_date(version, date):
    assert _release_date(version) == date


@pytest.mark.parametrize(
    ("version", "available", "pooling", "platform"),
    [("0.0~20221219.0", True, False, "ptrace"), ("0.0~20240729.0", True, True, "systrap"),
     ("0.0~20250601.0", False, True, "systrap"), ("dev", True, False, "ptrace")],
)  # fmt: skip
def test_an_untested_runsc_build_is_refused_with_the_reason(tmp_path, version, available,
                                                           pooling, platform):  # fmt: skip
    """A stand-in runsc (a script that only prints its version: the builds themselves cannot
    be installed side by side here): a build newer than the tested ones is unavailable, with
    why and what to install, so that 'auto' falls back and a gVisor kernelspec says so
    instead of failing in some new way; an administrator may still opt in. Warm pools only
    on builds that mount inside a running sandbox, and the doctor says which; the platform
    'auto' is systrap on the builds it was tested with, ptrace on older ones."""
    import os

    from sandbox_provisioner.runtimes.gvisor import GVisorRuntime, runsc_version

    if os.geteuid() != 0:
        pytest.skip("gVisor needs root: the availability check stops before the version")
    fake = tmp_path / "runsc"
    fake.write_text(f"#!/bin/sh\necho 'runsc version {version}'\necho 'spec: 1.0.2-dev'\n")
    fake.chmod(0o755)
    runsc_version.cache_clear()
    found = GVisorRuntime(runsc_path=str(fake)).availability()
    assert found.available is available, found
    assert GVisorRuntime(runsc_path=str(fake)).pooling is pooling
    assert GVisorRuntime(runsc_path=str(fake)).resolved_platform() == platform
    assert GVisorRuntime(runsc_path=str(fake), platform="ptrace").resolved_platform() == "ptrace"
    if available:
        assert f"platform {platform}" in str(found), found
        assert ("no warm pools" in str(found)) is not pooling, found
    if not available:
        assert "20250601" in str(found) and "bookworm" in str(found)
        assert GVisorRuntime(runsc_path=str(fake), allow_untested_runsc=True).availability()


def test_claim_names_and_labels_from_any_user_name():
    from agent_sandbox import api
    from sandbox_provisioner.runtimes.kubernetes import _name_part

    assert _name_part("Alice_Smith@Example.org") == "alice-smith-example"
    assert _name_part("___") == "user"
    assert api.label_value("Ünïcode user/with slash" * 5).isascii()
    assert len(api.label_value("x" * 100)) == 63
    assert api.label_value("-.edge.-") == "edge"


def test_a_servers_claims_are_selected_by_a_label_no_other_server_has():
    """Stopping a server deletes its kernels' claims by the server's label: ids that the
    lossy label_value made one ("a-b"'s default server and "a"'s server "b") must not."""
    from agent_sandbox import api
    from sandbox_provisioner.runtimes.kubernetes import hub_server_id, server_selector

    pairs = [("a-b", ""), ("a", "b"), ("a", "b-"), ("a-b", "c"), ("a", "b-c"), ("josé", ""),
             ("jos-", ""), ("jos-e9-", ""), ("x" * 80, ""), ("x" * 80, "y")]  # fmt: skip
    ids = {hub_server_id(*pair) for pair in pairs}
    assert len(ids) == len(pairs)
    selectors = {server_selector(i) for i in ids}
    assert len(selectors) == len(pairs)
    for value in (s.split("=", 1)[1] for s in selectors):
        assert value == api.label_value(value) and len(value) <= 63


def test_a_prepared_kernel_takes_only_variables_read_after_it_initialized():
    """What a go may change (a notebook's session name, a locale) and what it may not
    (anything Python, IPython or Jupyter read while the kernel initialized)."""
    from sandbox_provisioner.agent.kernel import late_env

    base = {"PATH": "/usr/bin", "HOME": "/tmp"}
    assert late_env(base, {**base, "JPY_SESSION_NAME": "a.ipynb", "LC_TIME": "C"}) == {
        "JPY_SESSION_NAME": "a.ipynb", "LC_TIME": "C"}  # fmt: skip
    assert late_env(base, dict(base)) == {}
    for name in ("PYTHONHASHSEED", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JPY_PARENT_PID",
                 "MPLBACKEND", "HOME"):  # fmt: skip
        assert late_env(base, {**base, name: "x"}) is None, name
    assert late_env(base, {"PATH": "/usr/bin"}) is None  # a variable it has and must not


async def test_a_temporary_user_just_made_is_not_taken_for_one_whose_server_stopped():
    """The Hub lists a user's never-started default server as stopped: a sweep that came
    between a launch making its temporary user and starting its server deleted the user
    (the launch then failed: "the Hub answered 404"). Only a server that ran counts."""
    import datetime

    from sandbox_spawner.hibernator import Hibernator

    sleeper = Hibernator("http://hub.invalid/hub/api", "unused", temporary_prefix="binder-",
                         dry_run=True)  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    fresh = {"name": "binder-1", "created": now.isoformat(),
             "servers": {"": {"stopped": True, "started": None, "state": {}}}}  # fmt: skip
    assert not await sleeper._delete_if_done(fresh, now)
    ran = {"name": "binder-2", "created": now.isoformat(), "servers": {"b-x": {
        "stopped": True, "state": {"last_start": {"seconds": 1.0, "at": now.isoformat()}}}}}
    assert await sleeper._delete_if_done(ran, now)


def test_a_frozen_server_hibernates_counting_from_its_last_activity_before_it_froze():
    """A frozen server cannot be asked: its idle time runs from the last activity its
    supervisor kept at freezing, or the Hub's later record, whichever is later."""
    import datetime

    from sandbox_spawner.hibernator import Hibernator

    sleeper = Hibernator("http://hub.invalid/hub/api", "unused", timeout=600, freeze_after=60)
    now = datetime.datetime.now(datetime.UTC)

    def ago(seconds: float) -> str:
        return (now - datetime.timedelta(seconds=seconds)).isoformat()

    server = {"started": ago(5000), "last_activity": ago(900)}
    assert sleeper.frozen_verdict(server, {"last_activity": ago(700)}, now).idle
    assert not sleeper.frozen_verdict(server, {"last_activity": ago(100)}, now).idle
    later = {"started": ago(5000), "last_activity": ago(30)}  # the Hub saw the user since
    assert not sleeper.frozen_verdict(later, {"last_activity": ago(700)}, now).idle
    # What the supervisor kept is a string it was given; anything else counts for nothing.
    assert sleeper.frozen_verdict(server, {"last_activity": "not a time"}, now).idle
    old = Hibernator("http://hub.invalid/hub/api", "unused", timeout=600, max_age=3600)
    assert old.frozen_verdict(server, {"last_activity": ago(10)}, now).idle  # its max age


def test_freeze_after_is_checked_against_the_timeout():
    import argparse

    import pytest

    from sandbox_spawner import hibernator

    parser = argparse.ArgumentParser()
    hibernator.add_arguments(parser)
    env = {"JUPYTERHUB_API_URL": "http://hub.invalid/hub/api", "JUPYTERHUB_API_TOKEN": "x"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        sleeper, interval = hibernator.from_args(parser.parse_args(
            ["--timeout=3600", "--freeze-after=600"]))  # fmt: skip
        assert (sleeper.freeze_after, interval) == (600, 60)
        sleeper, _ = hibernator.from_args(parser.parse_args(
            ["--timeout=300", "--freeze-after=600"]))  # fmt: skip
        assert sleeper.freeze_after == 0  # it would hibernate first: no freezing, a warning
        with pytest.raises(SystemExit, match="--freeze-after=-1"):
            hibernator.from_args(parser.parse_args(["--freeze-after=-1"]))


def test_groups_and_profiles_that_are_never_frozen():
    from sandbox_spawner.hibernator import Hibernator

    sleeper = Hibernator("http://hub.invalid/hub/api", "unused", freeze_after=60,
                         unfrozen_groups={"gpu-users"}, unfrozen_profiles={"gpu"})  # fmt: skip
    user = {"name": "ann", "groups": ["students"]}
    assert sleeper.freezes(user, {"state": {"profile": "cpu"}})
    assert not sleeper.freezes({**user, "groups": ["gpu-users"]}, {"state": {}})
    assert not sleeper.freezes(user, {"state": {"profile": "gpu"}})
    # The profile the spawner recorded counts, not what the user asked for.
    assert sleeper.freezes(user, {"state": {}, "user_options": {"profile": "gpu"}})
    off = Hibernator("http://hub.invalid/hub/api", "unused")
    assert not off.freezes(user, {"state": {}})


def test_ps_shows_no_control_character_to_the_terminal():
    """Owners' names and command lines are users' to choose: an escape sequence in them
    is printed as text, never sent to the administrator's terminal."""
    from sandbox_provisioner.cli import _shown

    assert _shown("Hub 0123: josé") == "Hub 0123: josé"
    shown = _shown("pid 7: x\x1b]0;pwned\x07\x1b[2J\r\n")
    assert shown == "pid 7: x\\x1b]0;pwned\\x07\\x1b[2J\\r\\n"
    assert all(c.isprintable() for c in shown)


def test_a_start_waits_for_its_claims_to_be_bound_but_not_for_a_node_that_does_not_fit():
    """The scheduler calls a pod Unschedulable while its new home's claim is not bound yet
    (seconds, on a real cluster): not a failure. No node that fits is one."""
    from sandbox_spawner.manifests import start_failure

    sandbox = {"status": {"conditions": []}}

    def pod(message: str) -> dict:
        scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": message}  # fmt: skip
        return {"status": {"conditions": [scheduled]}}

    unbound = "0/1 nodes are available: 1 pod has unbound immediate PersistentVolumeClaims."
    assert start_failure(sandbox, pod(unbound)) is None
    gpu = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    assert start_failure(sandbox, pod(gpu)) == f"the pod cannot be scheduled: {gpu}"
