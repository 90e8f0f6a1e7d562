"""Sandboxed Jupyter kernels: a jupyter_client kernel provisioner and its isolation runtimes."""

from .provisioner import SandboxProvisioner, SandboxStartError
from .runtimes import RuntimeUnavailable

__version__ = "0.1.0.dev0"
__all__ = ["RuntimeUnavailable", "SandboxProvisioner", "SandboxStartError", "__version__"]
