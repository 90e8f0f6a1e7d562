"""Kernels in claimed Sandboxes on the real node: gVisor pods from a warm pool.

Node: the real one (testcluster/realnode.py). The stand-in's suite
(test_kubernetes_kernels.py) covers the protocol's cases faster; this checks what
only a kubelet does: the shipped template's pod under gVisor with its security
context (uid, read-only root, no capabilities), its own address on the pod network,
which the server reaches for the agent's handshake and the kernel's five ports, its
readiness probe, and a pod the kubelet itself ends (not deleted through the API),
which the controller replaces.
"""

from __future__ import annotations

import pytest
import yaml
from cluster_fixtures import condition, wait_for
from conftest import KERNEL_AGE
from test_kubernetes_kernels import MANIFEST, claims_of, make_pool, ready_members, start

from agent_sandbox import api
from agent_sandbox.kube import PODS, SANDBOXES, TEMPLATES, WARM_POOLS

pytestmark = pytest.mark.usefixtures("real_controller")
#: No registry serves the node: the image was imported (a ``:latest`` tag means "pull
#: Always" to the kubelet otherwise).
LOCAL_IMAGE = {"imagePullPolicy": "IfNotPresent"}


@pytest.fixture
def real_pool(real_k8s, real_namespace, real_cluster, tmp_path) -> dict:
    return make_pool(real_k8s, real_namespace, real_cluster, tmp_path, **LOCAL_IMAGE)


async def test_a_kernel_from_the_warm_pool_in_a_gvisor_pod(real_k8s, real_namespace, real_pool,
                                                          start_kernel):  # fmt: skip
    k8s, ns = real_k8s, real_namespace
    warm = {m["metadata"]["name"] for m in ready_members(k8s, ns)}
    kernel = await start(start_kernel, real_pool)
    sandbox = kernel.provisioner()._sandbox
    assert sandbox.sandbox_name in warm
    assert await kernel.value(KERNEL_AGE) > 1  # prepared at boot, not when claimed
    pod = k8s.get(PODS, ns, sandbox.sandbox_name)
    assert pod["spec"]["nodeName"] == "real-node" and pod["spec"]["runtimeClassName"] == "gvisor"
    # The server reached the kernel on the pod's own address, over the pod network.
    (claim,) = claims_of(k8s, ns, kernel)
    assert kernel.km.ip == pod["status"]["podIP"] == claim["status"]["sandbox"]["podIPs"][0]
    assert kernel.km.ip.startswith("10.244.")
    # gVisor's kernel, as the template's security context says: uid 1000, no capabilities,
    # a read-only root, a writable home.
    facts = await kernel.value(
        "(__import__('platform').release(), os.getuid(), os.getgid(),"
        " open('/proc/self/status').read().split('CapEff:')[1].split()[0],"
        " os.access('/usr', os.W_OK), os.access(os.environ['HOME'], os.W_OK))"
    )
    assert facts == ("4.4.0", 1000, 1000, "0000000000000000", False, True)
    result = await kernel.run("import numpy; print(numpy.arange(4).sum())")
    assert result.stdout.strip() == "6"

    # Restart in place: same claim, same pod, a new process with nothing of the old one.
    assert (await kernel.run("x = 41")).ok
    await kernel.km.restart_kernel()
    await kernel.ready()
    assert (await kernel.run("print(x)")).error.get("ename") == "NameError"
    assert kernel.provisioner()._sandbox.sandbox_name == sandbox.sandbox_name
    assert k8s.get(PODS, ns, sandbox.sandbox_name)["metadata"]["uid"] == pod["metadata"]["uid"]

    await kernel.stop()
    wait_for(lambda: not claims_of(k8s, ns, kernel), 30, "the claim to go")
    wait_for(lambda: k8s.get(PODS, ns, sandbox.sandbox_name) is None, 60, "the pod to go")
    wait_for(lambda: len(ready_members(k8s, ns)) == len(warm), 120, "the pool to refill")


def test_a_member_the_kubelet_ends_is_replaced(real_k8s, real_namespace, tmp_path):
    """The kubelet ends a pod past its activeDeadlineSeconds (phase Failed,
    DeadlineExceeded): nothing was deleted through the API, and the pool replaces it."""
    k8s, ns = real_k8s, real_namespace
    template, pool = yaml.safe_load_all(MANIFEST.read_text())
    spec = template["spec"]["podTemplate"]["spec"]
    spec["activeDeadlineSeconds"] = 30
    container = spec["containers"][0]
    container |= {**LOCAL_IMAGE, "command": ["sleep", "infinity"], "args": []}
    container.pop("readinessProbe")
    pool["spec"]["replicas"] = 1
    k8s.create(TEMPLATES, ns, {k: template[k] for k in ("metadata", "spec")})
    k8s.create(WARM_POOLS, ns, {k: pool[k] for k in ("metadata", "spec")})
    selector = f"{api.LABEL_WARM_POOL_SANDBOX}={api.name_hash(pool['metadata']['name'])}"

    def ready():
        return [m for m in k8s.list(SANDBOXES, ns, selector)
                if condition(m, "Ready").get("status") == "True"]  # fmt: skip

    first = wait_for(ready, 90, "a ready member")[0]["metadata"]["name"]
    failed = wait_for(lambda: (k8s.get(PODS, ns, first) or {}).get("status", {}).get("reason")
                      == "DeadlineExceeded" and k8s.get(PODS, ns, first), 90,
                      "the kubelet to end the pod")  # fmt: skip
    assert failed["status"]["phase"] == "Failed"
    assert failed["metadata"].get("deletionTimestamp") is None  # not deleted: ended
    replacement = wait_for(lambda: [m for m in ready() if m["metadata"]["name"] != first], 120,
                           "a replacement member")  # fmt: skip
    assert len(replacement) == 1
    wait_for(lambda: k8s.get(SANDBOXES, ns, first) is None, 60, "the failed member deleted")
