"""Kernels on the test cluster: launch to first execute_reply, warm pool vs cold vs local.

One run starts the test cluster with its node agent and controller, applies the
shipped gVisor tier (``jupyter_config/kubernetes/python-gvisor.yaml``, with a
fresh controller key) as a warm pool of N and as an empty pool, and then, N
times round-robin: a plain ipykernel through jupyter_client's local-provisioner,
a kernel through the kubernetes runtime from the warm pool, and one from the
empty pool (a cold sandbox). Before each round the warm pool is back to N ready
members, so every warm start finds one. Prints p50/p95 and the ratios to local:

    .venv/bin/python benchmarks/cluster_kernel_startup.py [--kernels 20] [--real-node]

--real-node runs the pods on the real node (kubelet, containerd, gVisor pods on their
own addresses; testcluster/realnode.py, root) instead of the stand-in.

Target (issue): warm-pool kernel ready at p50 <= 1.5x local-provisioner.
BENCH_DIR=DIR keeps the logs in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from claim_startup import percentile
from kernel_startup import LOCAL, kernel_manager, time_to_first_reply
from testbed import REPO, run_in_workdir, running_cluster

from agent_sandbox.kube import TEMPLATES, WARM_POOLS, Kube
from sandbox_provisioner.agent.protocol import load_or_create_signing_key, public_key_text
from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager

NS = "default"
MANIFEST = REPO / "jupyter_config" / "kubernetes" / "python-gvisor.yaml"


async def apply_tier(kube: Kube, public_key: str, warm: int, real_node: bool = False) -> None:
    template, _ = yaml.safe_load_all(MANIFEST.read_text())
    container = template["spec"]["podTemplate"]["spec"]["containers"][0]
    if real_node:  # the node has the image (imported; no registry)
        container["imagePullPolicy"] = "IfNotPresent"
    for var in container["env"]:
        if var["name"] == "JUPYTER_SANDBOX_CONTROLLER_KEYS":
            var["value"] = public_key
    await kube.create(TEMPLATES, NS, {"metadata": template["metadata"], "spec": template["spec"]})
    for name, replicas in (("warm", warm), ("cold", 0)):
        spec = {"replicas": replicas, "sandboxTemplateRef": {"name": template["metadata"]["name"]}}
        await kube.create(WARM_POOLS, NS, {"metadata": {"name": name}, "spec": spec})


async def pool_ready(kube: Kube, n: int, timeout: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pool = await kube.get(WARM_POOLS, NS, "warm")
        if ((pool or {}).get("status") or {}).get("readyReplicas") == n:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the warm pool never had {n} ready members")


async def run(n: int, workdir: Path, real_node: bool) -> int:
    key_file = workdir / "controller-key.pem"
    public = public_key_text(load_or_create_signing_key(key_file))
    async with running_cluster(workdir, real_node=real_node) as (cluster, kube):
        print(f"node: {'real (kubelet, containerd, gVisor)' if real_node else 'stand-in'}")
        await apply_tier(kube, public, n, real_node)
        print(
            f"warm pool of {n} gVisor kernel sandboxes ready in {await pool_ready(kube, n):.0f} s"
        )
        specs = RuntimeKernelSpecManager()
        common = {"namespace": NS, "kubeconfig": str(cluster.kubeconfig),
                  "controller_key_file": str(key_file), "server_id": "bench"}  # fmt: skip
        specs.overrides = {"sandboxed-kubernetes": common}
        samples: dict[str, list[float]] = {LOCAL: [], "warm": [], "cold": []}
        with tempfile.TemporaryDirectory() as cwd:
            await time_to_first_reply(kernel_manager(LOCAL), cwd)  # warm-up: first imports
            for i in range(n):
                await pool_ready(kube, n)
                await asyncio.sleep(1)  # a pool at rest
                samples[LOCAL].append(await time_to_first_reply(kernel_manager(LOCAL), cwd))
                for pool in ("warm", "cold"):
                    common["warm_pool"] = pool
                    km = kernel_manager("kubernetes", specs)
                    samples[pool].append(await time_to_first_reply(km))
                last = ", ".join(f"{mode} {values[-1]:.2f} s" for mode, values in samples.items())
                print(f"round {i + 1}/{n}: {last}", flush=True)
    base = statistics.median(samples[LOCAL])
    print(f"\nlaunch -> first execute_reply, N={n} per mode, one run (seconds)")
    print(f"{'mode':<22}{'p50':>8}{'p95':>8}{'max':>8}{'p50 ratio':>11}")
    label = {
        LOCAL: "local-provisioner",
        "warm": "kubernetes, warm pool",
        "cold": "kubernetes, cold",
    }
    for mode, values in samples.items():
        p50 = statistics.median(values)
        print(f"{label[mode]:<22}{p50:8.3f}{percentile(values, 0.95):8.3f}{max(values):8.3f}"
              f"{p50 / base:10.2f}x")  # fmt: skip
    ratio = statistics.median(samples["warm"]) / base
    print(f"target (warm p50 <= 1.5x local-provisioner): {'met' if ratio <= 1.5 else 'NOT met'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=20, help="kernels per mode")
    parser.add_argument("--real-node", action="store_true", help="pods on the real node")
    args = parser.parse_args()
    return run_in_workdir(lambda workdir: run(args.kernels, workdir, args.real_node))


if __name__ == "__main__":
    sys.exit(main())
