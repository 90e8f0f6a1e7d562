"""How a kernel's sandbox comes to be, one way per module, mixed into the provisioner.

* :mod:`.plan`: what a sandbox holds (mounts, environment, workspace, limits);
  a cold start boots it (in ``provisioner.py``).
* :mod:`.pooled`: take a sandbox from a local warm pool and bind the workspace.
* :mod:`.template`: restore a gVisor sandbox from a template checkpoint.
* :mod:`.remote`: claim a Sandbox on a cluster (the kubernetes runtime).

Each is a mixin of :class:`~sandbox_provisioner.provisioner.SandboxProvisioner`
and reads its traits; none talks to jupyter_client itself.
"""
