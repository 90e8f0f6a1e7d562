"""A Hub user's server from a gVisor template: imported once, checkpointed, restored per start.

Under gVisor most of a server's start is importing jupyter_server, JupyterLab and
the Hub's extension (about 6 s of 7.5 with the ptrace platform). So the spawner
builds a *template*: a sandbox laid out as every user's server (the home, run
and control directories at the same destinations), running this module, which
imports all that, writes ``CTL/ready`` and waits. It is checkpointed there,
before it opens anything, and each later start of any user restores it into a
bundle of that user's own (their home, run directory and control directory as
sources) and writes ``CTL/go``.

The template runs as the sandbox's root with only CAP_SETUID and CAP_SETGID:
once restored, it reads ``CTL/start.json`` (the user's uid and gid, the
server's environment, arguments and directory), becomes that uid, which drops
every capability, and only then runs the server. Nothing of one user's is in
the template, so one serves everyone.

    python -m sandbox_spawner.server_template CTL
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

from sandbox_provisioner.agent.template import wait_for_go

#: What a server imports while it starts (the slow part under gVisor). Not
#: jupyterlab.labhubapp: importing it patches the Hub's auth into every handler class,
#: which the singleuser extension (what a server runs) does not expect.
SERVER_MODULES = (
    "jupyter_server.serverapp",
    "jupyterhub.singleuser",
    "jupyterhub.singleuser.extension",
    "jupyterlab.labapp",
    "jupyter_server_terminals",
    "jupyter_lsp",
    "notebook_shim",
)


def main(ctl: str) -> None:
    for name in SERVER_MODULES:
        with contextlib.suppress(ImportError):  # an extension this environment lacks
            importlib.import_module(name)
    with open(os.path.join(ctl, "ready"), "w") as f:
        f.write("ready")
    start = wait_for_go(ctl)
    os.setgroups([])
    os.setresgid(start["gid"], start["gid"], start["gid"])
    os.setresuid(start["uid"], start["uid"], start["uid"])  # no capability is left
    os.environ.clear()
    os.environ.update(start["env"])
    os.chdir(start["cwd"])
    sys.argv = ["jupyterhub-singleuser", *start["args"]]
    from jupyterhub.singleuser import main as serve

    serve()


if __name__ == "__main__":
    main(sys.argv[1])
