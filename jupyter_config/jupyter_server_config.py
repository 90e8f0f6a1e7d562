"""Jupyter Server configuration with every kernel sandboxed.

    jupyter lab --config=jupyter_config/jupyter_server_config.py

The SandboxProvisioner settings below apply to every sandboxed kernel; a
kernelspec's ``metadata.kernel_provisioner.config`` overrides them for its
kernels. ``jupyter sandbox doctor`` tells which runtimes work on this machine.
"""

c = get_config()  # noqa: F821 (provided by traitlets when the file is loaded)

# New notebooks get the sandboxed kernel; unsandboxed kernelspecs are not offered.
c.MappingKernelManager.default_kernel_name = "sandboxed-python"
c.KernelSpecManager.allowed_kernelspecs = {
    "sandboxed-python",
    "sandboxed-python-gvisor",
    "sandboxed-python-bubblewrap",
}
# Pools end with the server; claims a crashed run left on a cluster are deleted at start.
c.ServerApp.jpserver_extensions = {"sandbox_provisioner": True}
# A terminal is an unsandboxed shell on the host: off unless you trust every user.
c.ServerApp.terminals_enabled = False

# The isolation policy (these are the defaults, spelled out).
c.SandboxProvisioner.runtime = "auto"  # or "gvisor", "bubblewrap"
c.SandboxProvisioner.workspace = "notebook"  # notebook-readonly | root | scratch
c.SandboxProvisioner.network = "none"  # "host" lets kernels reach the network
c.SandboxProvisioner.memory_limit = "4G"
c.SandboxProvisioner.cpu_limit = 0  # cores; 0 = no limit
c.SandboxProvisioner.pids_limit = 512
c.SandboxProvisioner.env_allowlist = ["LANG", "LANGUAGE", "LC_*", "TZ", "JPY_SESSION_NAME"]
# Host paths to add, e.g. a shared read-only data set:
# c.SandboxProvisioner.extra_mounts = ["/srv/datasets:/data:ro"]

# Warm pools: kernels start from a sandbox started ahead of time, faster than a plain
# kernel (bubblewrap; gVisor with runsc 2024 or later, else from a template). Each idle
# pooled sandbox holds some memory (see benchmarks/kernel_startup.py).
c.SandboxProvisioner.pool_size = 1
# c.SandboxProvisioner.pool_preload = ["numpy", "pandas"]
