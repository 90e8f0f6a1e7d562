"""A gVisor template: a sandbox that imported a kernel's modules, checkpointed before it
opened anything, and restored once per kernel.

``python -m sandbox_provisioner.agent.template CTL`` imports ipykernel and what a
kernel imports while it starts, writes ``CTL/ready`` and polls for ``CTL/go``.
The provisioner checkpoints it at that point (no socket is open yet, which
runsc requires). Each restore gets a fresh bundle whose ``CTL`` is that
kernel's own directory, holding ``kernel.json`` (its connection file, IPC
sockets next to it) and ``start.json`` (environment, arguments, directory);
``go`` lets the restored process become that kernel.
"""

from __future__ import annotations

import json
import os
import sys
import time


def reseed() -> None:
    """Fresh random state for a restored process: every restore of one checkpoint starts
    with the same ``random`` (and, when imported, numpy) state, and no fork hook runs to
    reseed them as after ``os.fork``."""
    import random

    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def wait_for_go(ctl: str) -> dict:
    """Wait (the checkpoint is taken here) until restored and told to go; the start
    (``CTL/start.json``), with this process's random state made its own."""
    go = os.path.join(ctl, "go")
    while not os.path.exists(go):
        time.sleep(0.002)
    with open(os.path.join(ctl, "start.json")) as f:
        start = json.load(f)
    reseed()
    return start


def main(argv: list[str] | None = None) -> None:
    ctl = (argv if argv is not None else sys.argv[1:])[0]
    from .kernel import learn_kernel_imports, preload

    preload([])
    learned = learn_kernel_imports()
    with open(os.path.join(ctl, "ready"), "w") as f:
        f.write(str(learned))
    start = wait_for_go(ctl)
    os.environ.clear()
    os.environ.update(start["env"])
    os.chdir(start["cwd"])
    from ipykernel.kernelapp import IPKernelApp

    args = ["-f", os.path.join(ctl, "kernel.json"), *start["args"]]
    sys.argv = [sys.executable, *args]
    app = IPKernelApp.instance()
    app.initialize(args)
    app.start()


if __name__ == "__main__":
    main()
