"""The Hub half: each JupyterHub user's server in a sandbox.

* :mod:`.local`: ``LocalSandboxSpawner`` (spawner ``local-sandbox``), a user's
  server in a local gVisor or bubblewrap sandbox, run by a supervisor of its own
  (:mod:`.supervisor`);
* :mod:`.hibernator`: a Hub service that stops servers with no busy kernel, no
  open terminal and no recent activity (their files stay; a visit resumes).

It may use the provisioner's parts (``sandbox_provisioner``); the provisioner
never imports it.
"""
