"""The kernelspecs this package ships, and how to install them.

The files live in ``kernelspecs/<name>/`` (kernel.json and logos); the wheel
also installs them as data files under ``share/jupyter/kernels``, and
``jupyter sandbox kernelspec install`` copies them where Jupyter looks.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

PROVISIONER_NAME = "sandbox-provisioner"
#: The kernelspec the example configuration makes the default.
DEFAULT_KERNEL = "sandboxed-python"


def spec_dirs() -> dict[str, Path]:
    """Shipped kernelspec directories by kernel name."""
    root = Path(str(resources.files(__package__) / "kernelspecs"))
    return {p.name: p for p in sorted(root.iterdir()) if (p / "kernel.json").is_file()}


def install(*, user: bool = False, prefix: str | None = None, replace: bool = True) -> list[str]:
    """Install every shipped kernelspec; returns the installed directories."""
    ksm = KernelSpecManager()
    return [
        ksm.install_kernel_spec(str(src), name, user=user, prefix=prefix, replace=replace)
        for name, src in spec_dirs().items()
    ]


def runtime_of(spec: KernelSpec | dict[str, Any]) -> str | None:
    """The runtime a kernelspec asks for, or None when it is not a sandboxed kernelspec."""
    metadata = spec.metadata if isinstance(spec, KernelSpec) else spec.get("metadata", {})
    provisioner = (metadata or {}).get("kernel_provisioner", {})
    if provisioner.get("provisioner_name") != PROVISIONER_NAME:
        return None
    return provisioner.get("config", {}).get("runtime", "auto")


def installed() -> dict[str, tuple[str, str]]:
    """Installed sandboxed kernelspecs: name -> (runtime, resource dir)."""
    found = {}
    for name, info in KernelSpecManager().get_all_specs().items():
        runtime = runtime_of(info["spec"])
        if runtime is not None:
            found[name] = (runtime, info["resource_dir"])
    return found


def spec_for_runtime(name: str, **config: Any) -> KernelSpec:
    """An in-memory kernelspec for runtime ``name``; ``config`` adds provisioner options.

    Used by the doctor, tests and benchmarks.
    """
    data = json.loads((spec_dirs()[DEFAULT_KERNEL] / "kernel.json").read_text())
    data["metadata"]["kernel_provisioner"]["config"] = {"runtime": name, **config}
    data["display_name"] = f"Sandboxed Python ({name})"
    return KernelSpec(resource_dir=str(spec_dirs()[DEFAULT_KERNEL]), **data)


class RuntimeKernelSpecManager(KernelSpecManager):
    """Serves ``sandboxed-<runtime>`` names with :func:`spec_for_runtime`, others as usual.

    Lets a program start a sandboxed kernel of a given runtime and config
    without installing a kernelspec (the doctor, tests, benchmarks).
    """

    #: Per-name provisioner config, e.g. ``{"sandboxed-bubblewrap": {"memory_limit": "1G"}}``.
    overrides: dict[str, dict[str, Any]] = {}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name.startswith("sandboxed-") and kernel_name[10:] in _runtime_names():
            config = self.overrides.get(kernel_name, {})
            return spec_for_runtime(kernel_name[10:], **config)
        return super().get_kernel_spec(kernel_name)


def _runtime_names() -> list[str]:
    from .runtimes import known_names

    return known_names()
