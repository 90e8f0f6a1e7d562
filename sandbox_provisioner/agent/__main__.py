"""``python -m sandbox_provisioner.agent``: run the kernel agent, or make a controller key.

    python -m sandbox_provisioner.agent serve [--port 8900] [--preload numpy,pandas]
    python -m sandbox_provisioner.agent public-key KEYFILE   # made on first use

``serve`` reads the pinned controller keys from ``$JUPYTER_SANDBOX_CONTROLLER_KEYS``
(or ``--controller-keys``) and refuses to start without one. It makes itself
non-dumpable and forks the kernel factory (the zygote) before anything else,
so no kernel is a copy of a process that held a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os

from .protocol import (
    CONTROLLER_KEYS_ENV,
    DEFAULT_PORT,
    load_or_create_signing_key,
    parse_public_keys,
    public_key_text,
)

#: What a zygote that makes its kernels another user keeps besides what they keep.
MAKES_USER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")


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
    serve_p.add_argument(
        "--listen-fd", type=int, help="an inherited listening socket to serve on (local pools)"
    )
    serve_p.add_argument(
        "--listen-path", help="a Unix socket to make and serve on (local pools under gVisor)"
    )
    serve_p.add_argument(
        "--stage", action="append", default=[],
        help="a directory workspaces are bound from (local pools; may repeat)",
    )  # fmt: skip
    serve_p.add_argument(
        "--confine",
        action="store_true",
        help="pooled local sandbox: bind the workspace, kernels drop privileges",
    )
    serve_p.add_argument("--preload", default="", help="modules to import ahead (comma-separated)")
    serve_p.add_argument(
        "--kernel-caps", default="", help="capabilities a pooled sandbox's kernels keep"
    )
    serve_p.add_argument(
        "--kernel-user", default="",
        help="UID:GID a pooled sandbox's kernels become (an agent that starts as root)",
    )  # fmt: skip
    serve_p.add_argument("--workdir", default=os.getcwd(), help="the kernel's directory")
    serve_p.add_argument(
        "--prepare", type=json.loads, default=None,
        help='prepare the first kernel: {"connection": {IPC endpoint} or {"transport": '
             '"tcp"} (ports on --host), "args": [the kernel\'s arguments]}',
    )  # fmt: skip
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
    from .server import block_stop_signals, serve
    from .zygote import Zygote, ZygoteDied, set_dumpable

    set_dumpable(False)  # no kernel reads or writes this process's memory
    preloads = [m.strip() for m in args.preload.split(",") if m.strip()]
    kernel_caps = [c.strip() for c in args.kernel_caps.split(",") if c.strip()]

    def prepare() -> None:
        if args.confine:  # kernels of a pooled sandbox: their capabilities, their filter
            from ..seccomp import build_filter
            from .confine import output_inside, restrict

            output_inside(os.devnull)  # it reports to the agent over its socket
            # With a kernel user, the zygote stays the sandbox's root (so its kernels cannot
            # signal it: gVisor does not shield a pid namespace's init from them), keeping
            # only what making each kernel that user takes.
            keep = [*MAKES_USER_CAPS, *kernel_caps] if args.kernel_user else kernel_caps
            restrict(keep, build_filter())

    def become() -> None:
        from .confine import become as become_user
        from .confine import restrict

        become_user(*(int(part) for part in args.kernel_user.split(":")))
        restrict(kernel_caps)

    makes_user = args.confine and args.kernel_user
    try:
        zygote = Zygote.fork(prepare, preloads, [args.listen_fd] if args.listen_fd else [],
                             own_namespace=args.confine,
                             become=become if makes_user else None)  # fmt: skip
    except ZygoteDied as exc:
        parser.exit(1, f"kernel agent: {exc}\n")
    block_stop_signals()
    asyncio.run(serve(keys, zygote, workdir=args.workdir, host=args.host, port=args.port,
                      listen_fd=args.listen_fd, listen_path=args.listen_path,
                      stages=tuple(args.stage), confine=args.confine,
                      keep_caps=("CAP_KILL",) if args.kernel_user else (),
                      prepare=args.prepare))  # fmt: skip


if __name__ == "__main__":
    main()
