"""Sandboxed Jupyter kernels: a jupyter_client kernel provisioner and its isolation runtimes."""

from .provisioner import SandboxProvisioner, SandboxStartError
from .runtimes import RuntimeUnavailable

__version__ = "0.1.0.dev0"
__all__ = ["RuntimeUnavailable", "SandboxProvisioner", "SandboxStartError", "__version__"]


def _jupyter_server_extension_points() -> list[dict]:
    """The jupyter_server extension (pools end with the server; orphaned claims are swept)."""
    from .serverextension import SandboxExtension

    return [{"module": "sandbox_provisioner.serverextension", "app": SandboxExtension}]
