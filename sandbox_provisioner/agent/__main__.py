"""``python -m sandbox_provisioner.agent``: run the kernel agent, or make a controller key.

    python -m sandbox_provisioner.agent serve [--port 8900] [--preload numpy,pandas]
    python -m sandbox_provisioner.agent public-key KEYFILE   # made on first use

``serve`` reads the pinned controller keys from ``$JUPYTER_SANDBOX_CONTROLLER_KEYS``
(or ``--controller-keys``) and refuses to start without one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading

from .protocol import (
    CONTROLLER_KEYS_ENV,
    DEFAULT_PORT,
    load_or_create_signing_key,
    parse_public_keys,
    public_key_text,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox_provisioner.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the kernel agent (a sandbox's main process)")
    serve_p.add_argument("--host", default=os.environ.get("POD_IP") or "0.0.0.0",
                         help="address to listen on (default $POD_IP, else all)")  # fmt: skip
    serve_p.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve_p.add_argument(
        "--controller-keys",
        default=os.environ.get(CONTROLLER_KEYS_ENV, ""),
        help=f"pinned controller keys (default ${CONTROLLER_KEYS_ENV})",
    )
    serve_p.add_argument("--unix", help="listen on this Unix socket instead (local pools)")
    serve_p.add_argument("--stage", help="directory the workspaces are bound from (local pools)")
    serve_p.add_argument(
        "--confine",
        action="store_true",
        help="pooled local sandbox: bind the workspace, kernels drop privileges",
    )
    serve_p.add_argument("--preload", default="", help="modules to import ahead (comma-separated)")
    serve_p.add_argument("--workdir", default=os.getcwd(), help="the kernel's directory")
    key_p = sub.add_parser("public-key", help="print a controller key's public half")
    key_p.add_argument("keyfile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")

    if args.command == "public-key":
        print(public_key_text(load_or_create_signing_key(args.keyfile)))
        return
    try:
        keys = parse_public_keys(args.controller_keys)
    except ValueError as exc:
        parser.error(str(exc))
    if not keys:
        parser.error(f"no controller key: set ${CONTROLLER_KEYS_ENV} or --controller-keys "
                     "(the agent would obey no one)")  # fmt: skip
    from .kernel import learn_kernel_imports, preload
    from .server import serve

    preload([m.strip() for m in args.preload.split(",") if m.strip()])
    learned = learn_kernel_imports()
    log = logging.getLogger("jupyter-sandbox-agent")
    log.info("preloaded %d kernel modules", learned)
    if threading.active_count() > 1:  # the agent forks kernels: threads would not follow
        log.warning("a preloaded module started a thread: forked kernels may hang")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, keys, workdir=args.workdir, unix=args.unix,
                          stage=args.stage, confine=args.confine))  # fmt: skip


if __name__ == "__main__":
    main()
