"""A small JSON client for any Kubernetes resource, on kubernetes_asyncio's ApiClient.

Every reconciler works on plain dicts (as kopf hands them over): one generic
get/list/create/patch/delete over resource paths serves core kinds and custom
kinds alike, instead of a typed API class per group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException

from . import api

Obj = dict[str, Any]
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        return base + (f"/{sub}" if sub else "")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODS = Resource("", "v1", "pods", "Pod")
SERVICES = Resource("", "v1", "services", "Service")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
EVENTS = Resource("", "v1", "events", "Event")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
SECRETS = Resource("", "v1", "secrets", "Secret")
NODES = Resource("", "v1", "nodes", "Node")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition"
)


def custom(kind: api.Kind, version: str = api.STORAGE_VERSION) -> Resource:
    return Resource(kind.group, version, kind.plural, kind.kind)


SANDBOXES = custom(api.SANDBOX)
TEMPLATES = custom(api.SANDBOX_TEMPLATE)
CLAIMS = custom(api.SANDBOX_CLAIM)
WARM_POOLS = custom(api.SANDBOX_WARM_POOL)


def is_status(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def timestamp(when: datetime.datetime | None = None) -> str:
    return (when or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def load_config(kubeconfig: str | None = None) -> client.Configuration:
    """The client configuration: a kubeconfig file if given or found, else in-cluster."""
    cfg = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path or os.path.exists(os.path.expanduser("~/.kube/config")):
        await config.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return cfg


_AS_JSON = {200: "object", 201: "object", 202: "object"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                    "all_proxy")  # fmt: skip


def _without_environment_lookups(api_client: client.ApiClient) -> None:
    """kubernetes_asyncio's aiohttp session trusts the environment, so aiohttp looks up
    proxies and ``~/.netrc`` in a worker thread for every request: a fifth of a busy
    controller's CPU in a burst of claims. With no proxy in the environment the session is
    made again without those lookups, on the same connection pool."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return
    rest = api_client.rest_client
    trusting = rest.pool_manager
    rest.pool_manager = aiohttp.ClientSession(
        connector=trusting.connector, trust_env=False, read_bufsize=2**21
    )
    trusting.detach()  # the connector now belongs to the new session


class Kube:
    """JSON access to the API server; one per process (it owns an HTTP connection pool)."""

    def __init__(
        self,
        configuration: client.Configuration | None = None,
        *,
        api_client: client.ApiClient | None = None,
    ):
        """From a configuration, or sharing ``api_client`` (KubeSpawner's, in a Hub)."""
        if api_client is None:
            assert configuration is not None
            configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize, 64)
            api_client = client.ApiClient(configuration)
            _without_environment_lookups(api_client)
        self.api = api_client

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> Kube:
        return cls(await load_config(kubeconfig))

    async def close(self) -> None:
        await self.api.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request to ``path``; the decoded JSON answer (ApiException for errors)."""
        return await self.api.call_api(
            path,
            method,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            response_types_map=_AS_JSON,
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=30,
        )

    async def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self.call("GET", res.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, res: Resource, namespace: str | None = None, labels: str | None = None
    ) -> list[Obj]:
        query = {"labelSelector": labels} if labels else None
        return (await self.call("GET", res.path(namespace), query=query)).get("items", [])

    async def create(self, res: Resource, namespace: str | None, body: Obj) -> Obj:
        body = {"apiVersion": res.api_version, "kind": res.kind, **body}
        return await self.call("POST", res.path(namespace), body=body)

    async def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        sub: str = "",
        content_type: str = MERGE,
    ) -> Obj:
        return await self.call(
            "PATCH", res.path(namespace, name, sub), body=patch, content_type=content_type
        )

    async def replace(self, res: Resource, namespace: str | None, name: str, body: Obj) -> Obj:
        return await self.call("PUT", res.path(namespace, name), body=body)

    async def delete(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        uid: str | None = None,
        grace: int | None = None,
    ) -> bool:
        """Delete; False when already gone (or when ``uid`` no longer matches)."""
        body: Obj = {"propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        try:
            await self.call("DELETE", res.path(namespace, name), body=body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def event(self, obj: Obj, reason: str, message: str, type_: str = "Normal") -> None:
        """Record a core/v1 Event about ``obj`` (best effort)."""
        meta = obj["metadata"]
        stamp = timestamp()
        with contextlib.suppress(ApiException):  # best effort
            await self.create(
                EVENTS,
                meta["namespace"],
                {
                    "metadata": {
                        "generateName": f"{meta['name']}.",
                        "namespace": meta["namespace"],
                    },
                    "involvedObject": {
                        "apiVersion": obj["apiVersion"],
                        "kind": obj["kind"],
                        "name": meta["name"],
                        "namespace": meta["namespace"],
                        "uid": meta["uid"],
                    },
                    "reason": reason,
                    "message": message,
                    "type": type_,
                    "firstTimestamp": stamp,
                    "lastTimestamp": stamp,
                    "count": 1,
                    "source": {"component": "agent-sandbox-controller"},
                },
            )


def owner_reference(obj: Obj, controller: bool = True) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def controller_of(obj: Obj) -> Obj | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def is_controlled_by(obj: Obj, owner: Obj) -> bool:
    ref = controller_of(obj)
    return ref is not None and ref.get("uid") == owner["metadata"]["uid"]
