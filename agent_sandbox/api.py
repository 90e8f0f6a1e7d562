"""The Agent Sandbox API (kubernetes-sigs/agent-sandbox), defined once for every part.

Groups, versions, kinds, label and annotation keys, condition types and reasons,
and the naming rules, exactly as upstream spells them: the CRDs, the controller,
the kernel provisioner's cluster backend and the Hub spawner all import them
from here, so that this project and the upstream Go controller stay
interchangeable.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

CORE_GROUP = "agents.x-k8s.io"
EXTENSIONS_GROUP = "extensions.agents.x-k8s.io"
V1ALPHA1 = "v1alpha1"
V1BETA1 = "v1beta1"
#: The version objects are stored in; v1alpha1 is served too (deprecated).
STORAGE_VERSION = V1BETA1
SERVED_VERSIONS = (V1BETA1, V1ALPHA1)


@dataclass(frozen=True)
class Kind:
    group: str
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{STORAGE_VERSION}"

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


SANDBOX = Kind(CORE_GROUP, "Sandbox", "sandboxes", "sandbox", ("sandbox",))
SANDBOX_TEMPLATE = Kind(
    EXTENSIONS_GROUP, "SandboxTemplate", "sandboxtemplates", "sandboxtemplate", ("sandboxtemplate",)
)
SANDBOX_CLAIM = Kind(
    EXTENSIONS_GROUP, "SandboxClaim", "sandboxclaims", "sandboxclaim", ("sandboxclaim",)
)
SANDBOX_WARM_POOL = Kind(
    EXTENSIONS_GROUP, "SandboxWarmPool", "sandboxwarmpools", "sandboxwarmpool", ("swp",)
)
KINDS = (SANDBOX, SANDBOX_TEMPLATE, SANDBOX_CLAIM, SANDBOX_WARM_POOL)

# -- labels and annotations (prefix agents.x-k8s.io/) -----------------------------------------
PREFIX = "agents.x-k8s.io/"
EXTENSIONS_PREFIX = "extensions.agents.x-k8s.io/"
#: Label on the Pod, Service and PVCs of a Sandbox: name_hash(sandbox name).
LABEL_SANDBOX_NAME_HASH = PREFIX + "sandbox-name-hash"
#: Label on warm-pool members: name_hash(pool name).
LABEL_WARM_POOL_SANDBOX = PREFIX + "warm-pool-sandbox"
#: Label: name_hash(template name).
LABEL_TEMPLATE_REF_HASH = PREFIX + "sandbox-template-ref-hash"
#: Label: hash of the template's blueprint when the member was made (Recreate staleness).
LABEL_TEMPLATE_HASH = PREFIX + "sandbox-template-hash"
#: Label: "cold" or "warm".
LABEL_LAUNCH_TYPE = PREFIX + "launch-type"
#: Label: "controller" on objects this controller made.
LABEL_CREATED_BY = PREFIX + "created-by"
#: Label on an adopted Sandbox: the uid of the claim that owns it.
LABEL_CLAIM_UID = PREFIX + "claim-uid"
#: Annotation on a Sandbox: the template it was made from.
ANNOTATION_TEMPLATE_REF = PREFIX + "sandbox-template-ref"
#: Annotation on a claim: the Sandbox it was bound to.
ANNOTATION_SANDBOX_NAME = PREFIX + "sandbox-name"
#: Annotation on a Sandbox: the name of its pod.
ANNOTATION_POD_NAME = PREFIX + "pod-name"
#: "true" on an unowned Pod/Service/PVC lets a Sandbox adopt it.
ANNOTATION_ADOPTABLE = PREFIX + "adoptable"
#: Pod annotations listing the label/annotation keys the controller propagated.
ANNOTATION_PROPAGATED_LABELS = PREFIX + "propagated-labels"
ANNOTATION_PROPAGATED_ANNOTATIONS = PREFIX + "propagated-annotations"
ANNOTATION_SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"

LAUNCH_COLD = "cold"
LAUNCH_WARM = "warm"
CREATED_BY_CONTROLLER = "controller"
#: Label domains a claim's additionalPodMetadata may use unless the operator allows more.
DEFAULT_ALLOWED_LABEL_DOMAINS = ("sandbox.users.io",)
CONFIG_MAP_NAME = "agent-sandbox-config"
CONFIG_KEY_ALLOWED_LABEL_DOMAINS = "allowed-label-domains"


# -- this project's own keys (not upstream's): whose kernel runs in a claimed sandbox ---------
JUPYTER_PREFIX = "jupyter-sandbox.io/"
#: Claim labels: the kernel, its user and the notebook server that started it.
LABEL_KERNEL_ID = JUPYTER_PREFIX + "kernel-id"
LABEL_KERNEL_USER = JUPYTER_PREFIX + "user"
LABEL_KERNEL_SERVER = JUPYTER_PREFIX + "server"
#: Claim annotation: which run (process) of that server made the claim.
ANNOTATION_SERVER_RUN = JUPYTER_PREFIX + "server-run"
#: Pod labels of a claimed kernel sandbox (in the domain claims may set by default).
POD_LABEL_KERNEL_ID = DEFAULT_ALLOWED_LABEL_DOMAINS[0] + "/jupyter-kernel-id"
POD_LABEL_KERNEL_USER = DEFAULT_ALLOWED_LABEL_DOMAINS[0] + "/jupyter-user"


class OperatingMode(enum.StrEnum):
    RUNNING = "Running"
    SUSPENDED = "Suspended"


class ShutdownPolicy(enum.StrEnum):
    DELETE = "Delete"
    DELETE_FOREGROUND = "DeleteForeground"  # claims only
    RETAIN = "Retain"


class ConditionType(enum.StrEnum):
    READY = "Ready"
    SUSPENDED = "Suspended"
    POD_SCHEDULED = "PodScheduled"
    FINISHED = "Finished"


class Reason(enum.StrEnum):
    # Sandbox Ready
    DEPENDENCIES_READY = "DependenciesReady"
    DEPENDENCIES_NOT_READY = "DependenciesNotReady"
    SANDBOX_SUSPENDED = "SandboxSuspended"
    POD_SUCCEEDED = "PodSucceeded"
    POD_FAILED = "PodFailed"
    SANDBOX_EXPIRED = "SandboxExpired"
    RECONCILER_ERROR = "ReconcilerError"
    MULTIPLE_PODS = "MultiplePods"
    # Sandbox Suspended
    NOT_SUSPENDED = "NotSuspended"
    POD_TERMINATED = "PodTerminated"
    POD_TERMINATING = "PodTerminating"
    POD_NOT_OWNED = "PodNotOwned"
    POD_STATE_UNKNOWN = "PodStateUnknown"
    # SandboxClaim Ready
    TEMPLATE_NOT_FOUND = "TemplateNotFound"
    WARM_POOL_NOT_FOUND = "WarmPoolNotFound"
    ADOPTION_CONFLICT = "AdoptionConflict"
    SANDBOX_CREATE_PENDING = "SandboxCreatePending"
    INVALID_METADATA = "InvalidMetadata"
    ENV_VARS_INJECTION_REJECTED = "EnvVarsInjectionRejected"
    VOLUME_CLAIM_TEMPLATES_ERROR = "VolumeClaimTemplatesError"
    CLAIM_EXPIRED = "ClaimExpired"
    SANDBOX_MISSING = "SandboxMissing"
    SANDBOX_NOT_READY = "SandboxNotReady"


class EventReason(enum.StrEnum):
    MULTIPLE_PODS = "MultiplePods"
    CLAIM_EXPIRED = "ClaimExpired"
    SANDBOX_ADOPTED = "SandboxAdopted"
    SANDBOX_PROVISIONED = "SandboxProvisioned"
    WARM_POOL_NOT_PROGRESSING = "WarmPoolNotProgressing"
    WARM_POOL_PROGRESSING = "WarmPoolProgressing"


class InjectionPolicy(enum.StrEnum):
    """SandboxTemplate.envVarsInjectionPolicy and volumeClaimTemplatesPolicy."""

    ALLOWED = "Allowed"
    OVERRIDES = "Overrides"
    DISALLOWED = "Disallowed"


class NetworkPolicyManagement(enum.StrEnum):
    MANAGED = "Managed"
    UNMANAGED = "Unmanaged"


class UpdateStrategy(enum.StrEnum):
    RECREATE = "Recreate"
    ON_REPLENISH = "OnReplenish"


# -- names --------------------------------------------------------------------------------------
def name_hash(name: str) -> str:
    """FNV-1a 32-bit of ``name`` as 8 hex digits: the value of the *-hash labels."""
    h = 0x811C9DC5
    for byte in name.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def object_hash(obj: Any) -> str:
    """A stable short hash of a JSON-able object (the template blueprint hash)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def pvc_name(claim_template_name: str, sandbox: str) -> str:
    return f"{claim_template_name}-{sandbox}"


def network_policy_name(template: str) -> str:
    return f"{template}-network-policy"


def service_fqdn(sandbox: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    return f"{sandbox}.{namespace}.svc.{cluster_domain}"


def selector(sandbox: str) -> str:
    return f"{LABEL_SANDBOX_NAME_HASH}={name_hash(sandbox)}"


def reserved_key(key: str) -> bool:
    """Label/annotation keys users may not set through a pod template."""
    return key.startswith((PREFIX, EXTENSIONS_PREFIX))


def label_value(text: str) -> str:
    """``text`` as a valid label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in text)
    return cleaned[:63].strip("._-")


def unique_label_value(text: str) -> str:
    """``text`` as a label value that no other text has: :func:`label_value` is lossy (it
    cuts and replaces characters), so two users' ids could share one, and a selector for
    one would match the other's objects. A readable part, then a digest of all of it."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    readable = label_value(text)[:46].strip("._-")
    return f"{readable}-{digest}" if readable else digest
