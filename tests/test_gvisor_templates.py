"""gVisor kernels restored from a checkpointed template instead of booted.

The first kernel of a filesystem layout starts cold and a template is built in
the background; later kernels of that layout (the same notebook directory and
options) are restored from it, each with its own control directory, sockets and
workspace binding. Real runsc checkpoint/restore throughout.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from conftest import require_runtime

from sandbox_provisioner import templates


@pytest.fixture(autouse=True)
def _gvisor() -> None:
    require_runtime("gvisor")


async def template_ready(timeout: float = 120) -> templates.Template:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        ready = [t for t in templates._TEMPLATES.values() if t.ready]
        failed = [t.failed for t in templates._TEMPLATES.values() if t.failed]
        assert not failed, failed
        if ready:
            return ready[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no template became ready")


async def banner(kernel) -> str:
    reply = await kernel.kc.kernel_info(reply=True, timeout=30)
    return reply["content"]["banner"]


async def test_restored_kernel_is_a_full_sandboxed_kernel(start_kernel, notebook_dir: Path,
                                                          monkeypatch):  # fmt: skip
    first = await start_kernel("gvisor", snapshot_templates=True)
    assert "Sandboxed kernel: gvisor (cold start)" in await banner(first)
    template = await template_ready()
    assert (template.image).is_dir()
    await first.stop()

    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", secret)
    monkeypatch.setenv("LANG", "C.UTF-8")
    kernel = await start_kernel("gvisor", snapshot_templates=True)
    assert "Sandboxed kernel: gvisor (from a template)" in await banner(kernel)
    # Its own workspace, at its host path; the rest of the host as a cold kernel sees it.
    assert await kernel.value("os.getcwd()") == str(notebook_dir)
    assert await kernel.value("os.listdir('..')") == [notebook_dir.name]
    assert (await kernel.run("open('made.txt', 'w').write('x')")).ok
    assert (notebook_dir / "made.txt").exists()
    # This kernel's environment, not the template's; the allowlist still holds.
    env = await kernel.value("dict(os.environ)")
    assert env["LANG"] == "C.UTF-8" and "JUPYTERHUB_API_TOKEN" not in env
    assert secret not in repr(env)
    status = await kernel.value("open('/proc/self/status').read()")
    # No capability but CAP_DAC_OVERRIDE (a root server's kernels, inside the Sentry).
    expected = "0000000000000002" if os.geteuid() == 0 else "0000000000000000"
    assert f"CapEff:\t{expected}" in status
    # Restart: restored again, fresh state.
    assert (await kernel.run("x = 1")).ok
    await kernel.km.restart_kernel()
    await kernel.ready()
    assert (await kernel.run("print(x)")).error.get("ename") == "NameError"
    assert "(from a template)" in await banner(kernel)


async def test_two_kernels_restored_at_once_are_separate(start_kernel, notebook_dir: Path):
    first = await start_kernel("gvisor", snapshot_templates=True)
    await template_ready()
    await first.stop()
    a, b = await asyncio.gather(
        start_kernel("gvisor", snapshot_templates=True),
        start_kernel("gvisor", snapshot_templates=True),
    )
    assert (await a.run("x = 'a'")).ok and (await b.run("x = 'b'")).ok
    assert await a.value("x") == "a" and await b.value("x") == "b"
    assert a.km.connection_file != b.km.connection_file
    # Restored from one checkpoint, yet not one random state: nothing guessable in common.
    draw = "__import__('random').getrandbits(64)"
    assert await a.value(draw) != await b.value(draw)


async def test_another_layout_gets_its_own_template(start_kernel, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    k1 = await start_kernel("gvisor", cwd=one, snapshot_templates=True)
    await template_ready()
    await k1.stop()
    k2 = await start_kernel("gvisor", cwd=two, snapshot_templates=True)
    # A directory without a template yet starts cold, and sees only itself.
    assert "(cold start)" in await banner(k2)
    assert await k2.value("os.listdir('..')") == ["two"]
    assert len(templates._TEMPLATES) == 2


async def test_templates_are_removed_with_the_server(start_kernel):
    kernel = await start_kernel("gvisor", snapshot_templates=True)
    template = await template_ready()
    await kernel.stop()
    await templates.forget_templates()
    assert not template.directory.exists()


async def test_a_failed_restore_starts_cold_and_the_template_is_built_again(
    start_kernel, caplog
):
    first = await start_kernel("gvisor", snapshot_templates=True)
    broken = await template_ready()
    await first.stop()
    # Damage the checkpoint, as a disk error or a runsc that cannot read it would.
    for item in broken.image.iterdir():
        if item.is_file():
            item.write_bytes(b"not a checkpoint")
    kernel = await start_kernel("gvisor", snapshot_templates=True)
    assert "(cold start)" in await banner(kernel)
    assert (await kernel.run("print(6 * 7)")).stdout.strip() == "42"
    assert f"restoring gVisor template {broken.key} failed" in caplog.text
    assert templates._TEMPLATES.get(broken.key) is not broken  # forgotten
    # Built again for that layout, and later kernels restore from the new one.
    rebuilt = await template_ready()
    assert rebuilt is not broken and rebuilt.key == broken.key
    assert b"not a checkpoint" not in b"".join(
        f.read_bytes()[:16] for f in rebuilt.image.iterdir() if f.is_file()
    )
    await kernel.stop()
    again = await start_kernel("gvisor", snapshot_templates=True)
    assert "(from a template)" in await banner(again)


async def test_templates_are_bounded_least_recently_used_out(start_kernel, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    k1 = await start_kernel("gvisor", cwd=one, snapshot_templates=True, max_templates=1)
    first = await template_ready()
    await k1.stop()
    # Another notebook directory: another layout; with room for one, the first goes.
    k2 = await start_kernel("gvisor", cwd=two, snapshot_templates=True, max_templates=1)
    assert "(cold start)" in await banner(k2)
    assert not first.directory.exists() and first.key not in templates._TEMPLATES
    second = await template_ready()
    assert list(templates._TEMPLATES) == [second.key] != [first.key]
    await k2.stop()
    k3 = await start_kernel("gvisor", cwd=two, snapshot_templates=True, max_templates=1)
    assert "(from a template)" in await banner(k3)
