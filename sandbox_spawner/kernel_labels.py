"""Kernels named for what they are, in a Hub user's server: "Python 3 (sandboxed: gVisor)".

The whole server runs in the sandbox, so its kernels are plain ipykernel processes,
and jupyter_server would list "Python 3 (ipykernel)": a user told to pick a sandboxed
kernel would think theirs is not. The spawner makes this the server's kernel spec
manager (``c.ServerApp.kernel_spec_manager_class``) with the sandbox's ``label``; it
changes only the names shown (the Launcher, the kernel picker, the status bar), not
which kernels there are or how they start.
"""

from __future__ import annotations

import copy
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from traitlets import Unicode


def labelled(display_name: str, label: str) -> str:
    """``Python 3 (ipykernel)`` -> ``Python 3 (sandboxed: gVisor)``."""
    base = display_name.split(" (", 1)[0] if display_name.endswith(")") else display_name
    return f"{base} (sandboxed: {label})"


class SandboxedKernelSpecManager(KernelSpecManager):
    """Kernel specs as the base class finds them, their display names labelled."""

    label = Unicode("", config=True, help="The sandbox, as users should read it: 'gVisor'.")

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = super().get_kernel_spec(kernel_name)
        if self.label:
            spec.display_name = labelled(spec.display_name, self.label)
        return spec

    def get_all_specs(self) -> dict[str, Any]:
        specs = copy.deepcopy(super().get_all_specs())
        if self.label:
            for found in specs.values():
                spec = found.get("spec") or {}
                spec["display_name"] = labelled(spec.get("display_name", ""), self.label)
        return specs
