"""The Agent Sandbox controller: kopf watches, one reconciler per kind, leader election.

Run it alone (``python -m agent_sandbox run`` / ``agent-sandbox-controller``)
or inside another asyncio program (the Hub service) with :func:`run`::

    await run(kubeconfig=None, namespaces=["jupyterhub"])

kopf supplies the watch streams (list, then watch from a resourceVersion,
re-listing after 410 Gone); each event only triggers a key in the reconciler
queue of its kind (:mod:`.queue`), and the reconcilers
(:mod:`.sandbox`, :mod:`.template`, :mod:`.warmpool`, :mod:`.claim`) read the
current state through :class:`~agent_sandbox.kube.Kube` and write the
difference. Since they keep no state of their own, a controller killed at any
point converges when it starts again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import kopf
from kubernetes_asyncio.client.rest import ApiException

from .. import api, crds, webhook
from ..kube import CRDS, SECRETS, Kube, controller_of, is_status, load_config
from ..objects.conditions import is_true
from . import claim, sandbox, template, warmpool
from .context import Context, Options
from .leader import LeaderElector
from .queue import ReconcileQueue

log = logging.getLogger(__name__)

__all__ = ["Options", "run"]


def _login(cfg: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the same client configuration kubernetes_asyncio uses."""
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    scheme = None
    if token and " " in token:
        scheme, token = token.split(" ", 1)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme or ("Bearer" if token else None),
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def registry_for(ctx: Context, cfg: Any) -> kopf.OperatorRegistry:
    """kopf handlers: every watch event triggers a reconcile of the object it concerns."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return _login(cfg)

    # Handlers are coroutines: kopf runs plain functions in a thread pool, and the queues
    # belong to the event loop.
    def owner_trigger(body: Any, namespace: str) -> None:
        ref = controller_of(body)
        if ref is None:
            return
        if ref["kind"] == api.SANDBOX.kind:
            sandbox_changed(namespace, ref["name"], 0)
        else:
            ctx.trigger(ref["kind"], namespace, ref["name"])

    def sandbox_changed(namespace: str, name: str, delay: float) -> None:
        """Reconcile the Sandbox after ``delay``; one that is Ready waits while claims do
        (its follow-up work, such as an adopted pod's labels, serves none of them)."""
        sandbox = ctx.store.get(api.SANDBOX.kind, namespace, name)
        if sandbox is not None and is_true(sandbox, "Ready") and ctx.busy():
            ctx.trigger_when_quiet(api.SANDBOX.kind, namespace, name, delay)
        else:
            ctx.trigger_after(api.SANDBOX.kind, namespace, name, delay)

    for kind in api.KINDS:

        @kopf.on.event(
            kind.group,
            api.STORAGE_VERSION,
            kind.plural,
            registry=registry,
            id=f"watch-{kind.plural}",
        )
        async def on_custom(
            event: Any, body: Any, name: str, namespace: str, _kind: str = kind.kind, **_: Any
        ) -> None:
            ctx.store.seen(_kind, event.get("type"), event["object"])
            if _kind == api.SANDBOX.kind:
                # A sandbox's events come in bursts (adoption, its pod's status): coalesce them.
                sandbox_changed(namespace, name, ctx.options.sandbox_debounce)
            else:
                ctx.trigger(_kind, namespace, name)
            if _kind == api.SANDBOX.kind:
                owner_trigger(body, namespace)
            elif _kind == api.SANDBOX_TEMPLATE.kind:
                ctx.trigger(template.POOLS_OF_TEMPLATE, namespace, name)

    # Pods and Services of sandboxes: kept in the store, and their owner looks again.
    for plural, kind in (("pods", "Pod"), ("services", "Service")):

        @kopf.on.event(
            "",
            "v1",
            plural,
            registry=registry,
            id=f"watch-{plural}",
            labels={api.LABEL_SANDBOX_NAME_HASH: kopf.PRESENT},
        )
        async def on_child(
            event: Any, body: Any, namespace: str, _kind: str = kind, **_: Any
        ) -> None:
            ctx.store.seen(_kind, event.get("type"), event["object"])
            owner_trigger(body, namespace)

    return registry


#: The Secret holding the webhook CA all replicas share (in the lease namespace).
WEBHOOK_CA_SECRET = "agent-sandbox-webhook-ca"


async def shared_authority(kube: Kube, namespace: str) -> webhook.Authority:
    """The webhook CA of every replica: read from its Secret, made by the first replica."""
    for _ in range(5):
        found = await kube.get(SECRETS, namespace, WEBHOOK_CA_SECRET)
        if found is not None:
            data = found.get("data") or {}
            return webhook.Authority(base64.b64decode(data["ca.crt"]),
                                     base64.b64decode(data["ca.key"]))  # fmt: skip
        authority = webhook.Authority.new()
        data = {"ca.crt": _b64(authority.cert_pem), "ca.key": _b64(authority.key_pem)}
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
                "metadata": {"name": WEBHOOK_CA_SECRET, "namespace": namespace}}  # fmt: skip
        try:
            await kube.create(SECRETS, namespace, body)
            return authority
        except ApiException as exc:
            if not is_status(exc, 409):  # another replica made it first: read theirs
                raise
    raise RuntimeError(f"cannot read or create the Secret {namespace}/{WEBHOOK_CA_SECRET}")


async def install_conversion(kube: Kube, client_config: dict[str, Any]) -> None:
    """Point every CRD's conversion at this controller's webhook (with its CA)."""
    for crd in crds.all_crds(client_config):
        await kube.patch(
            CRDS, None, crd["metadata"]["name"], {"spec": {"conversion": crd["spec"]["conversion"]}}
        )


async def run(
    kubeconfig: str | None = None,
    *,
    namespaces: Sequence[str] = (),
    options: Options | None = None,
    leader_election: bool = True,
    lease_namespace: str = "default",
    lease_duration: float = 15.0,
    lease_renew: float = 5.0,
    webhook_host: str = "127.0.0.1",
    webhook_port: int | None = None,
    webhook_url: str | None = None,
    webhook_service: tuple[str, str, int] | None = None,
    metrics_port: int | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the controller until ``stop`` is set (or forever).

    The conversion webhook is served when ``webhook_port`` is given and the CRDs
    are pointed at ``webhook_url`` (e.g. ``https://127.0.0.1:9443/convert``) or at
    ``webhook_service`` (namespace, name, port) inside a cluster.
    """
    cfg = await load_config(kubeconfig)
    kube = Kube(cfg)
    ctx = Context(kube=kube, options=options or Options())
    stop = stop or asyncio.Event()
    runner = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1" if webhook_host == "127.0.0.1" else "")
    try:
        client_config: dict[str, Any] | None = None
        if webhook_port is not None:
            hosts = [webhook_host, "localhost"]
            if webhook_service:
                ns, name, _ = webhook_service
                hosts += [f"{name}.{ns}.svc", f"{name}.{ns}.svc.{ctx.options.cluster_domain}"]
            authority = await shared_authority(kube, lease_namespace)
            certs = webhook.make_certificates(hosts, authority)
            runner = await webhook.serve(webhook_host, webhook_port, certs)
            client_config = {"caBundle": _b64(certs.ca_pem)}
            if webhook_service:
                ns, name, port = webhook_service
                client_config["service"] = {
                    "namespace": ns,
                    "name": name,
                    "port": port,
                    "path": webhook.PATH,
                }
            else:
                client_config["url"] = (
                    webhook_url or f"https://{webhook_host}:{webhook_port}{webhook.PATH}"
                )

        async def lead() -> None:
            # The leader's webhook is the one the CRDs call (its CA, its address).
            if client_config is not None:
                await install_conversion(kube, client_config)
            await _operate(ctx, cfg, namespaces, ready, stop)

        if leader_election:
            elector = LeaderElector(
                kube, lease_namespace, duration=lease_duration, renew=lease_renew
            )
            election = asyncio.create_task(elector.run(lead))
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({election, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (election, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                await elector.release()
        else:
            await lead()
    finally:
        if runner is not None:
            await runner.cleanup()
        await kube.close()


async def _operate(
    ctx: Context,
    cfg: Any,
    namespaces: Sequence[str],
    ready: asyncio.Event | None,
    stop: asyncio.Event,
) -> None:
    ctx.queues = {
        # Worker counts as upstream's defaults (--sandbox-concurrent-workers 100,
        # --sandbox-claim-concurrent-workers 50, one each for pools and templates).
        api.SANDBOX.kind: ReconcileQueue(
            api.SANDBOX.kind, lambda ns, n: sandbox.reconcile(ctx, ns, n), workers=100
        ),
        api.SANDBOX_TEMPLATE.kind: ReconcileQueue(
            api.SANDBOX_TEMPLATE.kind, lambda ns, n: template.reconcile(ctx, ns, n), workers=2
        ),
        template.POOLS_OF_TEMPLATE: ReconcileQueue(
            template.POOLS_OF_TEMPLATE, lambda ns, n: template.trigger_pools(ctx, ns, n), workers=1
        ),
        api.SANDBOX_WARM_POOL.kind: ReconcileQueue(
            api.SANDBOX_WARM_POOL.kind, lambda ns, n: warmpool.reconcile(ctx, ns, n), workers=4
        ),
        api.SANDBOX_CLAIM.kind: ReconcileQueue(
            api.SANDBOX_CLAIM.kind, lambda ns, n: claim.reconcile(ctx, ns, n), workers=50
        ),
    }
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    # A controller of named namespaces (a Hub's, bound by a RoleBinding) may not list
    # namespaces and CRDs cluster-wide: it serves those namespaces and the kinds found at
    # start instead of retrying for a minute before falling back to that.
    settings.scanning.disabled = bool(namespaces) and not any(
        set(ns) & set("*?[!") for ns in namespaces
    )
    kopf_ready = asyncio.Event()
    kopf_stop = asyncio.Event()
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry_for(ctx, cfg),
            settings=settings,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            ready_flag=kopf_ready,
            stop_flag=kopf_stop,
        )
    )
    try:
        waiter = asyncio.create_task(kopf_ready.wait())
        await asyncio.wait({operator, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if ready is not None and kopf_ready.is_set():
            ready.set()
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({operator, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        kopf_stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(operator, timeout=10)
        for queue in ctx.queues.values():
            await queue.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
