"""What the watches have seen: the latest body of every object the reconcilers read.

kopf events keep it current; reconcilers read from here instead of asking the API
server on every pass, as controller-runtime's informer cache does for upstream.
The store may lag the server by a watch event: anything created since is looked
up with a GET when missing (:meth:`Context.read`), creations a reconcile made are
remembered until their event arrives (``expect``), and writes that must not race
carry a resourceVersion.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from .. import api

Obj = dict[str, Any]
Key = tuple[str, str]  # namespace, name

#: Labels indexed per kind: pods and services by sandbox, sandboxes by pool and by claim.
_INDEXED = {
    "Pod": (api.LABEL_SANDBOX_NAME_HASH,),
    "Service": (api.LABEL_SANDBOX_NAME_HASH,),
    api.SANDBOX.kind: (api.LABEL_WARM_POOL_SANDBOX, api.LABEL_CLAIM_UID),
}
_EXPECTATION_TTL = 30.0


class Store:
    def __init__(self) -> None:
        self._objects: dict[str, dict[Key, Obj]] = defaultdict(dict)
        self._index: dict[tuple[str, str, str, str], dict[str, Obj]] = defaultdict(dict)
        #: (kind, namespace) -> name -> (when, owner name, body) of objects created, not yet seen.
        self._expected: dict[Key, dict[str, tuple[float, str, Obj]]] = defaultdict(dict)

    def seen(self, kind: str, event_type: str | None, body: Obj) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        self._expected[(kind, meta["namespace"])].pop(meta["name"], None)
        old = self._objects[kind].get(key)
        if old is not None:
            self._reindex(kind, old, remove=True)
        if event_type == "DELETED":
            self._objects[kind].pop(key, None)
            return
        self._objects[kind][key] = body
        self._reindex(kind, body)

    def _reindex(self, kind: str, body: Obj, remove: bool = False) -> None:
        meta = body["metadata"]
        labels = meta.get("labels") or {}
        for label in _INDEXED.get(kind, ()):
            value = labels.get(label)
            if value is None:
                continue
            bucket = self._index[(kind, label, meta["namespace"], value)]
            if remove:
                bucket.pop(meta["name"], None)
            else:
                bucket[meta["name"]] = body

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._objects[kind].get((namespace, name))

    def labelled(self, kind: str, label: str, namespace: str, value: str) -> list[Obj]:
        """Objects of ``kind`` whose ``label`` (one of those in _INDEXED) has ``value``."""
        return list(self._index[(kind, label, namespace, value)].values())

    # -- expectations: objects a reconcile created whose watch event has not come yet ---------
    def expect(self, kind: str, namespace: str, owner: str, body: Obj) -> None:
        name = body["metadata"]["name"]
        if (namespace, name) not in self._objects[kind]:
            self._expected[(kind, namespace)][name] = (time.monotonic(), owner, body)

    def expected(self, kind: str, namespace: str, owner: str) -> list[Obj]:
        bucket = self._expected[(kind, namespace)]
        now = time.monotonic()
        for name in [n for n, (t, _, _) in bucket.items() if now - t > _EXPECTATION_TTL]:
            del bucket[name]
        return [b for _, o, b in bucket.values() if o == owner]
