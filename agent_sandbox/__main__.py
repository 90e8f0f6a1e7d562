"""``python -m agent_sandbox`` (also ``agent-sandbox-controller``): run the controller, or CRDs.

python -m agent_sandbox run [--kubeconfig F] [--namespace NS ...] [--webhook-port P]
python -m agent_sandbox crds [--write DIR]      print (or write) the CRDs as YAML
python -m agent_sandbox install-crds [--kubeconfig F]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import yaml

from . import crds

CRD_DIR = Path(__file__).parent / "crds"


def crd_yaml() -> dict[str, str]:
    """File name -> YAML text of each CRD, as shipped in ``agent_sandbox/crds/``."""
    return {
        f"{c['spec']['group']}_{c['spec']['names']['plural']}.yaml": yaml.safe_dump(
            c, sort_keys=False, width=100
        )
        for c in crds.all_crds()
    }


async def install_crds(kubeconfig: str | None) -> None:
    from .kube import CRDS, Kube, is_status

    kube = await Kube.connect(kubeconfig)
    try:
        for crd in crds.all_crds():
            try:
                await kube.create(CRDS, None, crd)
                print(f"created {crd['metadata']['name']}")
            except Exception as exc:
                if not is_status(exc, 409):
                    raise
                current = await kube.get(CRDS, None, crd["metadata"]["name"])
                crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                if "conversion" in current["spec"]:  # keep the webhook a controller installed
                    crd["spec"]["conversion"] = current["spec"]["conversion"]
                await kube.replace(CRDS, None, crd["metadata"]["name"], crd)
                print(f"updated {crd['metadata']['name']}")
    finally:
        await kube.close()


def add_run_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The controller's options (also the Hub service's, which runs it in-process)."""
    parser.add_argument("--kubeconfig")
    parser.add_argument("--namespace", action="append", help="watch only these (default: all)")
    parser.add_argument("--cluster-domain", default="cluster.local")
    parser.add_argument("--warm-pool-readiness-grace", type=float, default=300.0)
    parser.add_argument("--burst-hold", type=float, help="at most this long (seconds; default "
                        "2) work that no waiting claim needs waits for them")  # fmt: skip
    parser.add_argument("--no-leader-election", action="store_true")
    parser.add_argument("--lease-namespace", default="default")
    parser.add_argument("--lease-duration", type=float, default=15.0, help="seconds")
    parser.add_argument("--lease-renew", type=float, default=5.0, help="seconds")
    parser.add_argument("--webhook-host", default="127.0.0.1")
    parser.add_argument("--webhook-port", type=int, help="serve the v1alpha1 conversion webhook")
    parser.add_argument("--webhook-url", help="the URL the API server calls (default: host:port)")
    parser.add_argument("--webhook-service", help="NAMESPACE/NAME/PORT of the webhook's Service")


async def run_from_args(
    args: argparse.Namespace, stop: asyncio.Event, metrics_port: int | None = None
) -> None:
    """Run the controller as ``args`` (from :func:`add_run_arguments`) say, until ``stop``."""
    from .controller import Options, run

    service = None
    if args.webhook_service:
        ns, name, port = args.webhook_service.split("/")
        service = (ns, name, int(port))
    await run(
        args.kubeconfig,
        namespaces=args.namespace or (),
        options=Options(
            cluster_domain=args.cluster_domain,
            warm_pool_readiness_grace=args.warm_pool_readiness_grace,
            **({"burst_hold": args.burst_hold} if args.burst_hold is not None else {}),
        ),
        leader_election=not args.no_leader_election,
        lease_namespace=args.lease_namespace,
        lease_duration=args.lease_duration,
        lease_renew=args.lease_renew,
        webhook_host=args.webhook_host,
        webhook_port=args.webhook_port,
        webhook_url=args.webhook_url,
        webhook_service=service,
        metrics_port=metrics_port,
        stop=stop,
    )


def quiet_client_logs() -> None:
    for noisy in ("kubernetes_asyncio", "kopf", "aiohttp"):  # their DEBUG is per request
        logging.getLogger(noisy).setLevel(logging.INFO)


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_from_args(args, stop, args.metrics_port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent-sandbox-controller", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run_p = sub.add_parser("run", help="run the controller")
    add_run_arguments(run_p)
    run_p.add_argument("--metrics-port", type=int)
    run_p.add_argument("--log-level", default="INFO")
    crd_p = sub.add_parser("crds", help="print the CRDs as YAML")
    crd_p.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR")
    inst_p = sub.add_parser("install-crds", help="create or update the CRDs in the cluster")
    inst_p.add_argument("--kubeconfig")
    args = parser.parse_args(argv)
    if args.command == "run":
        quiet_client_logs()
        logging.basicConfig(
            level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        asyncio.run(_run(args))
    elif args.command == "crds":
        files = crd_yaml()
        if args.write:
            for name, text in files.items():
                (Path(args.write) / name).write_text(text)
        else:
            sys.stdout.write("---\n".join(files.values()))
    elif args.command == "install-crds":
        asyncio.run(install_crds(args.kubeconfig))
    else:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
