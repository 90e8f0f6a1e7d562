"""What a SandboxTemplate wants: its managed NetworkPolicy, and the blueprint it hands on."""

from __future__ import annotations

import copy
from typing import Any

from .. import api
from ..kube import owner_reference

Obj = dict[str, Any]

#: Egress to public addresses only: private ranges, link-local (metadata servers) and
#: cluster DNS are out of reach, as upstream's secure default.
PRIVATE_V4 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"]
PRIVATE_V6 = ["fc00::/7", "fe80::/10"]
ROUTER_NAMESPACE = "agent-sandbox-system"
PUBLIC_NAMESERVERS = ["8.8.8.8", "1.1.1.1"]
BLUEPRINT_FIELDS = (
    "podTemplate",
    "volumeClaimTemplates",
    "service",
    "shutdownTime",
    "shutdownPolicy",
)


def blueprint(template: Obj) -> Obj:
    spec = template.get("spec") or {}
    return {k: copy.deepcopy(spec[k]) for k in BLUEPRINT_FIELDS if k in spec}


def blueprint_hash(template: Obj) -> str:
    return api.object_hash(blueprint(template))


def managed(template: Obj) -> bool:
    return (template.get("spec") or {}).get(
        "networkPolicyManagement", api.NetworkPolicyManagement.MANAGED
    ) == api.NetworkPolicyManagement.MANAGED


def custom_rules(template: Obj) -> bool:
    policy = (template.get("spec") or {}).get("networkPolicy") or {}
    return bool(policy.get("ingress") or policy.get("egress"))


def desired_network_policy(template: Obj) -> Obj:
    meta = template["metadata"]
    policy = (template.get("spec") or {}).get("networkPolicy") or {}
    ingress = policy.get("ingress") or [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": ROUTER_NAMESPACE}
                    },
                    "podSelector": {"matchLabels": {"app": "sandbox-router"}},
                }
            ],
        }
    ]
    egress = policy.get("egress") or [
        {
            "to": [
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_V4}},
                {"ipBlock": {"cidr": "::/0", "except": PRIVATE_V6}},
            ],
        }
    ]
    return {
        "metadata": {
            "name": api.network_policy_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {api.LABEL_TEMPLATE_REF_HASH: api.name_hash(meta["name"])},
            "ownerReferences": [owner_reference(template)],
        },
        "spec": {
            "podSelector": {
                "matchLabels": {api.LABEL_TEMPLATE_REF_HASH: api.name_hash(meta["name"])}
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def secure_blueprint(template: Obj) -> Obj:
    """The blueprint with upstream's secure defaults for claim and pool sandboxes."""
    spec = blueprint(template)
    pod = spec["podTemplate"]
    pod_spec = pod.setdefault("spec", {})
    pod_spec.setdefault("automountServiceAccountToken", False)
    if managed(template) and not custom_rules(template) and "dnsPolicy" not in pod_spec:
        pod_spec["dnsPolicy"] = "None"
        pod_spec["dnsConfig"] = {"nameservers": list(PUBLIC_NAMESERVERS)}
    labels = pod.setdefault("metadata", {}).setdefault("labels", {})
    labels[api.LABEL_TEMPLATE_REF_HASH] = api.name_hash(template["metadata"]["name"])
    return spec
