"""``jupyter sandbox``: kernelspecs and a health check for sandboxed kernels.

jupyter sandbox kernelspec install [--user|--sys-prefix|--prefix=DIR]
jupyter sandbox kernelspec list
jupyter sandbox doctor [--brief]
jupyter sandbox controller-key [--key-file=PATH]
jupyter sandbox ps [--json] [--end=NAME]
"""

from __future__ import annotations

import os
import sys

from jupyter_core.application import JupyterApp
from traitlets import Bool, Unicode

from . import __version__, doctor, kernelspecs


class InstallKernelspecsApp(JupyterApp):
    name = "jupyter-sandbox-kernelspec-install"
    description = "Install the Sandboxed Python kernelspecs."
    user = Bool(False, config=True, help="Install for the current user only.")
    sys_prefix = Bool(False, config=True, help="Install into sys.prefix (e.g. the virtualenv).")
    prefix = Unicode("", config=True, help="Install under this prefix.")
    replace = Bool(True, config=True, help="Replace existing kernelspecs of the same name.")
    flags = {
        "user": ({"InstallKernelspecsApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": ({"InstallKernelspecsApp": {"sys_prefix": True}}, "Install in sys.prefix."),
        "replace": ({"InstallKernelspecsApp": {"replace": True}}, "Replace existing specs."),
    }
    aliases = {"prefix": "InstallKernelspecsApp.prefix"}

    def start(self) -> None:
        prefix = sys.prefix if self.sys_prefix else (self.prefix or None)
        for path in kernelspecs.install(user=self.user, prefix=prefix, replace=self.replace):
            print(f"installed {path}")


class ListKernelspecsApp(JupyterApp):
    name = "jupyter-sandbox-kernelspec-list"
    description = "List installed sandboxed kernelspecs and their runtimes."

    def start(self) -> None:
        found = kernelspecs.installed()
        if not found:
            print("no sandboxed kernelspecs installed; run: jupyter sandbox kernelspec install")
            return
        width = max(map(len, found))
        for name, (runtime, path) in sorted(found.items()):
            print(f"  {name:<{width}}  runtime={runtime:<10}  {path}")


class KernelspecApp(JupyterApp):
    name = "jupyter-sandbox-kernelspec"
    description = "Manage the Sandboxed Python kernelspecs."
    subcommands = {
        "install": (InstallKernelspecsApp, InstallKernelspecsApp.description),
        "list": (ListKernelspecsApp, ListKernelspecsApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        self.subapp.start()


class DoctorApp(JupyterApp):
    name = "jupyter-sandbox-doctor"
    description = "Report which sandbox runtimes work on this machine, and why not."
    brief = Bool(False, config=True, help="Only check that the parts are here; start no kernel.")
    flags = {"brief": ({"DoctorApp": {"brief": True}}, "Start no kernel.")}

    def start(self) -> None:
        self.exit(doctor.run(full=not self.brief, parent=self))


class ControllerKeyApp(JupyterApp):
    name = "jupyter-sandbox-controller-key"
    description = (
        "Print this server's controller key (made on first use) for the kernel sandbox "
        "templates' JUPYTER_SANDBOX_CONTROLLER_KEYS."
    )
    key_file = Unicode("", config=True, help="The private key file (default: the runtime's).")
    aliases = {"key-file": "ControllerKeyApp.key_file"}

    def start(self) -> None:
        from .agent.protocol import load_or_create_signing_key, public_key_text
        from .runtimes.kubernetes import KubernetesRuntime

        path = self.key_file or KubernetesRuntime(parent=self).controller_key_file
        print(public_key_text(load_or_create_signing_key(path)))


class PsApp(JupyterApp):
    name = "jupyter-sandbox-ps"
    description = ("List every sandbox on this machine (whose, runtime, state, age, CPU, "
                   "memory), or end one.")  # fmt: skip
    json = Bool(False, config=True, help="Print JSON, for scripts.")
    end = Unicode("", config=True, help="End the sandbox of this name (see the list).")
    flags = {"json": ({"PsApp": {"json": True}}, "Print JSON.")}
    aliases = {"end": "PsApp.end"}

    def start(self) -> None:
        import json

        from . import sandboxes

        if os.geteuid() != 0:
            self.log.warning("not root: only this user's sandboxes' memory is readable, "
                             "and owners may be unknown")  # fmt: skip
        found = sandboxes.list_sandboxes()
        if self.end:
            chosen = [s for s in found if s.name == self.end]
            if not chosen:
                self.log.error("no sandbox %r runs here (jupyter sandbox ps lists them)",
                               self.end)  # fmt: skip
                self.exit(1)
            sandboxes.end(chosen[0])
            print(f"ended {_shown(self.end)} ({chosen[0].kind} of "
                  f"{_shown(chosen[0].owner) or 'unknown'})")
            return
        if self.json:
            print(json.dumps([s.as_json() for s in found], indent=1))
            return
        print(f"{'NAME':44} {'KIND':8} {'RUNTIME':10} {'STATE':8} {'AGE':>7} {'CPU s':>8} "
              f"{'PSS MiB':>8}  OWNER")  # fmt: skip
        for s in found:
            cpu = f"{s.cpu_seconds:.1f}" if s.cpu_seconds is not None else "-"
            print(f"{_shown(s.name)[:44]:44} {s.kind:8} {s.runtime:10} {s.state:8} "
                  f"{_age(s.uptime):>7} {cpu:>8} {s.pss_bytes / 2**20:8.0f}  {_shown(s.owner)}")


def _shown(text: str) -> str:
    """``text`` for a terminal: names and command lines are users' to choose, and a control
    character (an escape sequence) would act on the administrator's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class SandboxApp(JupyterApp):
    name = "jupyter-sandbox"
    version = __version__
    description = "Sandboxed Jupyter kernels: kernelspecs and diagnostics."
    subcommands = {
        "kernelspec": (KernelspecApp, KernelspecApp.description),
        "doctor": (DoctorApp, DoctorApp.description),
        "controller-key": (ControllerKeyApp, ControllerKeyApp.description),
        "ps": (PsApp, PsApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        self.subapp.start()


def main() -> None:
    SandboxApp.launch_instance()


if __name__ == "__main__":
    sys.exit(main())
