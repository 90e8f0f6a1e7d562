"""gVisor templates: restore a checkpointed, pre-imported sandbox instead of booting one.

gVisor cannot take a workspace after it starts, so it cannot join a warm pool;
but it can restore a checkpoint into a new bundle whose mounts have the same
destinations (their sources may differ). A *template* is a sandbox with
exactly a kernel's filesystem layout, its control directory at
:data:`CTL_TARGET`, that imported ipykernel and what a kernel imports while it
starts, and was checkpointed before it opened anything
(:mod:`sandbox_provisioner.agent.template`). Kernels whose layout matches
(the same workspace, options and Python) are restored from it; the first
kernel of a layout starts cold and the template is built in the background.
Images live in the server's state directory and are removed when it exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import SandboxSpec

#: Where a template's (and each restored kernel's) control directory is inside.
CTL_TARGET = "/run/jupyter-sandbox/ctl"
BUILD_TIMEOUT = 180.0


@dataclass
class Template:
    key: str
    directory: Path
    ready: bool = False
    failed: str = ""
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    #: When a kernel last restored from it (monotonic): the least recently used goes first.
    used: float = field(default_factory=time.monotonic)

    @property
    def image(self) -> Path:
        return self.directory / "image"


_TEMPLATES: dict[str, Template] = {}


def layout_key(spec: SandboxSpec, state_dir: Path) -> str:
    """What must match for a restore: mount destinations and kinds, sources outside the
    kernel's own directory (the workspace, Python), network, limits, hostname."""
    state = str(state_dir)

    def source(text: str | None) -> str | None:
        return "$STATE" + text[len(state) :] if text and text.startswith(state) else text

    layout = {
        "mounts": [(m.target, m.kind.value, m.writable, source(m.source)) for m in spec.mounts],
        "python": spec.argv[0],
        "network": spec.network.value,
        "limits": [spec.limits.memory_bytes, spec.limits.cpus, spec.limits.pids],
        "hostname": spec.hostname,
    }
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:24]


def ready_template(key: str) -> Template | None:
    found = _TEMPLATES.get(key)
    if found is None or not found.ready:
        return None
    found.used = time.monotonic()
    return found


def ensure_template(
    key: str,
    root: Path,
    build: Callable[[Template], Awaitable[None]],
    log: Any,
    limit: int = 0,
) -> Template | None:
    """The template for ``key``, its build started in the background if there is none.

    ``limit`` (0: none) bounds this process's templates: to make room, the least recently
    used ready ones are removed; when every one is still being built, none is started
    (the kernel just starts cold) and None is returned.
    """
    found = _TEMPLATES.get(key)
    if found is not None:
        return found
    if limit:
        for old in sorted((t for t in _TEMPLATES.values() if t.ready), key=lambda t: t.used):
            if len(_TEMPLATES) < limit:
                break
            log.info("gVisor template %s removed to make room (max_templates=%d): the least "
                     "recently used", old.key, limit)  # fmt: skip
            discard(old)
        if len(_TEMPLATES) >= limit:
            return None
    template = _TEMPLATES[key] = Template(key, root / key)

    async def run() -> None:
        try:
            await asyncio.wait_for(build(template), BUILD_TIMEOUT)
            template.ready = True
            log.info("gVisor template %s is ready: later kernels restore from it", key)
        except Exception as exc:
            template.failed = str(exc) or type(exc).__name__
            log.warning("gVisor template %s failed (kernels start cold): %s", key,
                        template.failed)  # fmt: skip
            shutil.rmtree(template.directory, ignore_errors=True)

    template.task = asyncio.get_running_loop().create_task(run())
    return template


def discard(template: Template) -> None:
    """Forget a template a restore failed from: the next kernel of its layout builds it
    again. (A kernel restoring from it at this moment may fail too; it then starts cold.)"""
    if _TEMPLATES.get(template.key) is template:
        del _TEMPLATES[template.key]
    shutil.rmtree(template.directory, ignore_errors=True)


async def wait_for_file(path: Path, alive: Callable[[], Awaitable[bool]], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not path.exists():
        if not await alive():
            raise RuntimeError("the template sandbox exited before it was ready")
        if loop.time() > deadline:
            raise TimeoutError(f"the template sandbox was not ready within {timeout:g}s")
        await asyncio.sleep(0.05)


async def forget_templates() -> None:
    """Drop every template of this process (tests; the server's exit does it too)."""
    templates = list(_TEMPLATES.values())
    _TEMPLATES.clear()
    for template in templates:
        if template.task is not None:
            template.task.cancel()
            with contextlib.suppress(BaseException):
                await template.task
        shutil.rmtree(template.directory, ignore_errors=True)


@atexit.register
def _remove_images() -> None:
    for template in list(_TEMPLATES.values()):
        shutil.rmtree(template.directory, ignore_errors=True)
