"""The four CustomResourceDefinitions, generated from :mod:`agent_sandbox.api`.

Schemas follow upstream's field names, types, enums and defaults; the embedded
PodSpec and PVC specs are kept open (``x-kubernetes-preserve-unknown-fields``):
the API server validates them for real when the controller creates the pods.
v1beta1 is stored; v1alpha1 is served and converted by the controller's
conversion webhook (:mod:`agent_sandbox.conversion`). ``agent_sandbox/crds/``
holds the same CRDs as YAML for ``kubectl apply -f`` (``python -m
agent_sandbox crds`` writes them; a test keeps them in step).
"""

from __future__ import annotations

import copy
from typing import Any

from . import api

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
OPEN: Schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
DATE_TIME: Schema = {"type": "string", "format": "date-time"}


def obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


def enum(*values: str, default: str | None = None) -> Schema:
    schema: Schema = {"type": "string", "enum": [str(v) for v in values]}
    if default is not None:
        schema["default"] = str(default)
    return schema


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


METADATA = obj({"labels": STRING_MAP, "annotations": STRING_MAP})
CONTAINER = {**OPEN, "required": ["name"], "properties": {"name": STRING, "image": STRING}}
POD_SPEC = {**OPEN, "required": ["containers"], "properties": {"containers": array(CONTAINER)}}
POD_TEMPLATE = obj({"metadata": METADATA, "spec": POD_SPEC}, required=["spec"])
VOLUME_CLAIM_TEMPLATE = obj(
    {
        "metadata": obj({"name": STRING, "labels": STRING_MAP, "annotations": STRING_MAP}),
        "spec": OPEN,
    },
    required=["metadata"],
)
VOLUME_CLAIM_TEMPLATES = {**array(VOLUME_CLAIM_TEMPLATE), "x-kubernetes-list-type": "atomic"}
CONDITION = obj(
    {
        "type": STRING,
        "status": enum("True", "False", "Unknown"),
        "reason": STRING,
        "message": STRING,
        "lastTransitionTime": DATE_TIME,
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
    },
    required=["type", "status"],
)
CONDITIONS = {
    **array(CONDITION),
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}
NAME_REF = obj({"name": STRING}, required=["name"])


def blueprint(version: str) -> dict[str, Schema]:
    """SandboxBlueprint: shared by Sandbox and SandboxTemplate."""
    fields: dict[str, Schema] = {
        "podTemplate": POD_TEMPLATE,
        "volumeClaimTemplates": VOLUME_CLAIM_TEMPLATES,
        "service": {"type": "boolean"},
        "shutdownTime": DATE_TIME,
        "shutdownPolicy": enum(
            api.ShutdownPolicy.DELETE, api.ShutdownPolicy.RETAIN, default=api.ShutdownPolicy.RETAIN
        ),
    }
    if version == api.V1BETA1:
        fields["operatingMode"] = enum(*api.OperatingMode, default=api.OperatingMode.RUNNING)
    else:
        fields["replicas"] = {
            "type": "integer",
            "format": "int32",
            "minimum": 0,
            "maximum": 1,
            "default": 1,
        }
    return fields


def sandbox_schema(version: str) -> Schema:
    status: dict[str, Schema] = {
        "serviceFQDN": STRING,
        "service": STRING,
        "conditions": CONDITIONS,
        "selector": STRING,
        "podIPs": array(STRING),
    }
    if version == api.V1BETA1:
        status["nodeName"] = STRING
    else:
        status["replicas"] = {"type": "integer", "format": "int32"}
    return {"spec": obj(blueprint(version), required=["podTemplate"]), "status": obj(status)}


def template_schema(version: str) -> Schema:
    rule = obj({}, **{"x-kubernetes-preserve-unknown-fields": True})
    spec = {
        **blueprint(version),
        "networkPolicy": obj({"ingress": array(rule), "egress": array(rule)}),
        "networkPolicyManagement": enum(
            *api.NetworkPolicyManagement, default=api.NetworkPolicyManagement.MANAGED
        ),
        "envVarsInjectionPolicy": enum(
            *api.InjectionPolicy, default=api.InjectionPolicy.DISALLOWED
        ),
    }
    spec.pop("operatingMode", None)
    spec.pop("replicas", None)
    if version == api.V1BETA1:
        spec["volumeClaimTemplatesPolicy"] = enum(
            *api.InjectionPolicy, default=api.InjectionPolicy.DISALLOWED
        )
    return {"spec": obj(spec, required=["podTemplate"])}


def warm_pool_schema(version: str) -> Schema:
    spec = obj(
        {
            "replicas": {"type": "integer", "format": "int32", "minimum": 0, "default": 1},
            "sandboxTemplateRef": NAME_REF,
            "updateStrategy": obj(
                {"type": enum(*api.UpdateStrategy, default=api.UpdateStrategy.ON_REPLENISH)}
            ),
        },
        required=["sandboxTemplateRef"],
    )
    status = obj(
        {
            "replicas": {"type": "integer", "format": "int32"},
            "readyReplicas": {"type": "integer", "format": "int32"},
            "selector": STRING,
            "observedGeneration": {"type": "integer", "format": "int64"},
        }
    )
    return {"spec": spec, "status": status}


def claim_schema(version: str) -> Schema:
    env = obj({"name": STRING, "value": STRING, "containerName": STRING}, required=["name"])
    lifecycle = obj(
        {
            "shutdownTime": DATE_TIME,
            "ttlSecondsAfterFinished": {"type": "integer", "format": "int32", "minimum": 0},
            "shutdownPolicy": enum(*api.ShutdownPolicy, default=api.ShutdownPolicy.RETAIN),
        }
    )
    spec: dict[str, Schema] = {
        "lifecycle": lifecycle,
        "additionalPodMetadata": METADATA,
        "env": array(env),
        "volumeClaimTemplates": VOLUME_CLAIM_TEMPLATES,
    }
    required = []
    if version == api.V1BETA1:
        spec["warmPoolRef"] = NAME_REF
        required = ["warmPoolRef"]
    else:
        spec["sandboxTemplateRef"] = NAME_REF
        spec["warmpool"] = STRING
        required = ["sandboxTemplateRef"]
    status = obj(
        {
            "conditions": CONDITIONS,
            "sandbox": obj({"name": STRING, "podIPs": array(STRING)}),
        }
    )
    return {"spec": obj(spec, required=required), "status": status}


def _columns(kind: api.Kind) -> list[dict[str, Any]]:
    ready = {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    }
    reason = {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    }
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    if kind is api.SANDBOX:
        return [ready, reason, age]
    if kind is api.SANDBOX_CLAIM:
        return [
            ready,
            {"name": "Sandbox", "type": "string", "jsonPath": ".status.sandbox.name"},
            reason,
            age,
        ]
    if kind is api.SANDBOX_WARM_POOL:
        return [
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
            age,
        ]
    return []


_SCHEMAS = {
    api.SANDBOX: sandbox_schema,
    api.SANDBOX_TEMPLATE: template_schema,
    api.SANDBOX_CLAIM: claim_schema,
    api.SANDBOX_WARM_POOL: warm_pool_schema,
}


def crd(kind: api.Kind, conversion: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CRD of ``kind``; ``conversion`` is the webhook clientConfig (None: strategy None)."""
    versions = []
    for version in api.SERVED_VERSIONS:
        properties = {
            "apiVersion": STRING,
            "kind": STRING,
            "metadata": {"type": "object"},
            **_SCHEMAS[kind](version),
        }
        entry: dict[str, Any] = {
            "name": version,
            "served": True,
            "storage": version == api.STORAGE_VERSION,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": properties}},
        }
        if version == api.V1ALPHA1:
            entry["deprecated"] = True
        columns = _columns(kind)
        if columns:
            entry["additionalPrinterColumns"] = columns
        subresources: dict[str, Any] = {}
        if "status" in properties:
            subresources["status"] = {}
        if kind is api.SANDBOX_WARM_POOL:
            subresources["scale"] = {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            }
        if kind is api.SANDBOX and version == api.V1ALPHA1:
            subresources["scale"] = {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            }
        if subresources:
            entry["subresources"] = subresources
        versions.append(entry)
    spec: dict[str, Any] = {
        "group": kind.group,
        "names": {
            "kind": kind.kind,
            "listKind": f"{kind.kind}List",
            "plural": kind.plural,
            "singular": kind.singular,
            "shortNames": list(kind.short_names),
        },
        "scope": "Namespaced",
        "versions": versions,
    }
    if conversion is not None:
        spec["conversion"] = {
            "strategy": "Webhook",
            "webhook": {
                "conversionReviewVersions": ["v1"],
                "clientConfig": copy.deepcopy(conversion),
            },
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name},
        "spec": spec,
    }


def all_crds(conversion: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [crd(kind, conversion) for kind in api.KINDS]
