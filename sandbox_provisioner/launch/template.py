"""gVisor kernels restored from a template (a mixin; templates themselves are
:mod:`..templates`, the runner :mod:`..agent.template`)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from .. import instance, templates
from ..agent.kernel import write_private_json
from ..runtimes import Sandbox, banner_arguments
from ..spec import SandboxSpec
from .plan import TEMPLATE_MODULE


async def _alive(sandbox: Sandbox) -> bool:
    return await sandbox.poll() is None


class TemplateLaunch:
    """Mixin: find (or start building) a template for a kernel's layout; its control files."""

    parent: Any
    log: Any
    state_root: str
    max_templates: int
    kernel_dir: Path
    runtime_instance: Any
    _layout: tuple[str | None, bool, bool]
    _inside_uid: Any

    def _template(self, spec: SandboxSpec, cmd: list[str]) -> templates.Template | None:
        """The ready template for this kernel's layout; else None, and one is built."""
        key = templates.layout_key(spec, self.kernel_dir)
        found = templates.ready_template(key)
        if found is not None:
            return found
        runtime = self.runtime_instance
        workspace, writable, scratch = self._layout
        runner, _ = self._own_module(cmd, spec.env, TEMPLATE_MODULE)

        async def build(template: templates.Template) -> None:
            tdir = template.directory / "sandbox"
            (tdir / "ipc").mkdir(parents=True, mode=0o700)
            if scratch:
                (tdir / "scratch").mkdir()
            template_spec = dataclasses.replace(
                spec,
                kernel_id=f"template-{template.directory.parent.parent.name}-{template.key}",
                argv=[*runner, templates.CTL_TARGET],
                mounts=self._mounts(
                    cmd,
                    spec.env,
                    workspace,
                    writable,
                    tdir / "scratch" if scratch else None,
                    tdir,
                    self._inside_uid(),
                    ctl=True,
                ),
                state_dir=tdir,
                log_path=tdir / "template.log",
            )
            sandbox = await runtime.launch(template_spec)
            try:
                await templates.wait_for_file(tdir / "ipc" / "ready",
                                              lambda: _alive(sandbox), 120)  # fmt: skip
                await runtime.checkpoint(sandbox, template.image)
            finally:
                await sandbox.cleanup()
                shutil.rmtree(tdir, ignore_errors=True)

        # In this server's own directory: another server's template of the same layout is
        # another template, and neither's exit touches the other's.
        templates.ensure_template(
            key, instance.directory(self.state_root) / "templates", build, self.log,
            limit=self.max_templates,
        )  # fmt: skip
        return None

    def _write_ctl(self, spec: SandboxSpec) -> None:
        """The connection file (and, for a restore, the rest of what the template needs to
        become this kernel) in the kernel's control directory."""
        ctl = self.kernel_dir / "ipc"
        info = {**self.parent.get_connection_info(session=False)}
        info.update(ip=f"{templates.CTL_TARGET}/k", key=self.parent.session.key.decode())
        args = spec.argv[spec.argv.index("-f") + 2 :] if "-f" in spec.argv else []
        args = [a for a in args if not a.startswith("--InteractiveShell.banner2=")]
        args += banner_arguments(spec.argv, f"{self.runtime_instance.name} (from a template)")
        write_private_json(ctl / "kernel.json", info)
        write_private_json(ctl / "start.json", {"env": spec.env, "args": args, "cwd": spec.cwd})
