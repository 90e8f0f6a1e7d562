"""Bad input gets a clear error naming the problem, and leaves nothing behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from traitlets import TraitError
from traitlets.config import Config

from sandbox_provisioner import RuntimeUnavailable, SandboxStartError
from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager, spec_for_runtime
from sandbox_provisioner.provisioner import SandboxProvisioner


def manager(spec_runtime: str, config: Config | None = None, **provisioner: object):
    """A kernel manager for the ``sandboxed-<spec_runtime>`` spec with provisioner overrides."""
    ksm = RuntimeKernelSpecManager()
    ksm.overrides = {f"sandboxed-{spec_runtime}": provisioner}
    return AsyncKernelManager(
        kernel_name=f"sandboxed-{spec_runtime}", kernel_spec_manager=ksm, config=config or Config()
    )


def state_dirs() -> set[Path]:
    """Kernels' directories in the state root (not the servers' own, see instance.py)."""
    root = Path(SandboxProvisioner().state_root)
    return {p for p in root.iterdir() if p.name != "servers"} if root.is_dir() else set()


def left_by(km: AsyncKernelManager) -> list[Path]:
    """What a failed start of ``km`` left in the state root: its kernel's directory.
    (Not "anything new": another server of this uid may start kernels meanwhile.)"""
    assert km.kernel_id
    return [p for p in state_dirs() if km.kernel_id in p.name]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("runtime", "docker", "unknown sandbox runtime 'docker'; choose one of: auto, gvisor"),
        ("memory_limit", "lots", "invalid memory_limit 'lots'"),
        ("memory_limit", -5, "must not be negative"),
        ("pids_limit", -1, "invalid pids_limit -1"),
        ("cpu_limit", -0.5, "invalid cpu_limit -0.5"),
        ("launch_timeout", 0, "invalid launch_timeout 0"),
        ("workspace", "everything", "'workspace' trait"),
        ("network", "internet", "'network' trait"),
        ("extra_mounts", ["data:relative"], "the sandbox path must be absolute"),
        ("extra_mounts", ["/no/such/dir"], "/no/such/dir does not exist"),
        ("memroy_limit", "1G", "unknown sandbox-provisioner option(s) 'memroy_limit'"),
    ],
)
async def test_invalid_config_is_named(option, value, message, tmp_path):
    before = state_dirs()
    km = manager("bubblewrap", **{option: value})
    with pytest.raises(TraitError) as error:
        await km.start_kernel(cwd=str(tmp_path))
    assert message in str(error.value)
    assert not km.has_kernel
    assert state_dirs() <= before  # nothing new (a sweep may remove a dead server's)


@pytest.mark.parametrize(
    ("runtime", "trait", "hint"),
    [
        ("bubblewrap", "BubblewrapRuntime.bwrap_path", "apt-get install bubblewrap"),
        ("gvisor", "GVisorRuntime.runsc_path", "apt-get install runsc"),
    ],
)
async def test_missing_runtime_says_what_to_install(runtime, trait, hint, tmp_path):
    cls, name = trait.split(".")
    km = manager(runtime, Config({cls: {name: "/nonexistent/binary"}}))
    with pytest.raises(RuntimeUnavailable) as error:
        await km.start_kernel(cwd=str(tmp_path))
    text = str(error.value)
    assert f"the {runtime} sandbox runtime is not available" in text
    assert hint in text and "never runs unsandboxed" in text
    assert not km.has_kernel


async def test_auto_with_no_runtime_refuses_to_start(tmp_path):
    config = Config(
        {
            "BubblewrapRuntime": {"bwrap_path": "/nonexistent/bwrap"},
            "GVisorRuntime": {"runsc_path": "/nonexistent/runsc"},
        }
    )
    km = manager("auto", config)
    with pytest.raises(RuntimeUnavailable, match="no sandbox runtime is available"):
        await km.start_kernel(cwd=str(tmp_path))


async def test_launch_timeout_ends_in_clear_error(tmp_path):
    from conftest import require_runtime

    require_runtime("gvisor")  # takes seconds to boot: a short timeout always fires
    # Cold: a template build in the background would add the shared templates directory.
    km = manager("gvisor", launch_timeout=0.2, snapshot_templates=False)
    with pytest.raises(SandboxStartError, match=r"within launch_timeout=0.2s"):
        await km.start_kernel(cwd=str(tmp_path))
    assert left_by(km) == []
    assert not Path(km.connection_file).exists()


class _FailingSpecs(RuntimeKernelSpecManager):
    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = spec_for_runtime(kernel_name.removeprefix("failing-"))
        spec.argv = [sys.executable, "-c", "import sys; sys.exit('kernel refused to start')"]
        return spec


async def test_kernel_dying_at_start_reports_its_output(cold_runtime, tmp_path):
    runtime = cold_runtime
    km = AsyncKernelManager(kernel_name=f"failing-{runtime}", kernel_spec_manager=_FailingSpecs())
    with pytest.raises(SandboxStartError) as error:
        await km.start_kernel(cwd=str(tmp_path))
    assert "exited with code 1 while starting" in str(error.value)
    assert "kernel refused to start" in str(error.value)
    assert left_by(km) == []


async def test_filesystem_root_is_refused_as_workspace(cold_runtime):
    runtime = cold_runtime
    km = manager(runtime)
    with pytest.raises(SandboxStartError, match="whole filesystem"):
        await km.start_kernel(cwd="/")
    assert left_by(km) == []


@pytest.mark.parametrize("bad", ["..", "../../victim", ".hidden", "a/b", "x" * 101,
                                 "hub-0123456789ab-2-work", "kernel-hub-0123456789ab-2-work",
                                 "server-template-x", "template-x", "pool-x", "binder-x"])
async def test_a_kernel_id_that_is_a_path_is_refused(bad, tmp_path):
    """jupyter_server takes a client's ``kernel_id`` (``POST /api/kernels``); the provisioner
    makes a directory, cgroups and a container of it, and removes the directory when a
    start fails. ``..`` made it the state root's parent, removed whole (``/tmp``); a cgroup
    ``jupyter-sandbox/..`` is the root group. One that is not a plain name is refused, and
    nothing is made or removed. (The state root is the test's own, so that a regression
    removes only the test's directory.)"""
    state_root = tmp_path / "a" / "b" / "state"
    state_root.mkdir(parents=True)
    (tmp_path / "a" / "b" / "sentinel").write_text("kept")
    (tmp_path / "a" / "victim" / "runsc").mkdir(parents=True)
    km = manager("bubblewrap", state_root=str(state_root))
    km.kernel_id = bad
    with pytest.raises(SandboxStartError, match=r"kernel id .* refused"):
        await km.start_kernel(cwd=str(tmp_path))
    assert (tmp_path / "a" / "b" / "sentinel").read_text() == "kept"
    assert (tmp_path / "a" / "victim" / "runsc").is_dir()
    assert list(state_root.iterdir()) == []
    assert not km.has_kernel
