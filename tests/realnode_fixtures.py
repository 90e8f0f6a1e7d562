"""Fixtures for tests on the real node (pytest plugin, loaded by conftest).

One real node per test session (:mod:`testcluster.realnode`: kubelet, containerd,
runc and gVisor, in a network namespace of its own) with a cluster of its own: its
API server listens on the node's link, and it runs a scheduler, which the stand-in's
cluster does without. The stand-in's fixtures (``cluster``, ``k8s``, ``node_agent``)
are untouched; these are ``real_cluster``, ``real_k8s``, ``real_namespace`` and
``real_controller``. Without root, the binaries or the node's packages a test fails in
CI and is skipped on a developer machine with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cluster_fixtures import (
    Client,
    Process,
    _unavailable,
    controller_process,
    new_namespace,
    wait_for_leader,
)

from agent_sandbox import crds
from testcluster import realnode
from testcluster.cluster import TestCluster, kube_binaries
from testcluster.realnode import RealNode

#: What the real node needs from the machine (scripts/setup installs it when root).
NODE_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "runsc",
              "unshare", "nsenter", "ip")  # fmt: skip


@dataclass
class RealCluster:
    cluster: TestCluster
    node: RealNode


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> Iterator[RealCluster]:
    if os.geteuid() != 0:
        _unavailable("the real node needs root")
    missing = [tool for tool in NODE_TOOLS if not shutil.which(tool)]
    if missing:
        _unavailable(f"the real node needs {', '.join(missing)} (scripts/setup installs them)")
    try:
        bins = kube_binaries()
    except RuntimeError as exc:
        _unavailable(str(exc))
    sysctls = {name: realnode.sysctl(name) for name in realnode.KUBELET_SYSCTLS}
    with realnode.running(tmp_path_factory.mktemp("realnode"), bins,
                          crds=crds.all_crds()) as (cluster, node):  # fmt: skip
        yield RealCluster(cluster, node)
        # The kubelet set its sysctls in the node's namespace only, never the machine's.
        assert {name: realnode.sysctl(name) for name in realnode.KUBELET_SYSCTLS} == sysctls
    # Nothing of it left (reported as the last test's teardown error).
    assert realnode.leftovers() == []


@pytest.fixture(scope="session")
def real_cluster(real: RealCluster) -> TestCluster:
    return real.cluster


@pytest.fixture(scope="session")
def real_k8s(real_cluster: TestCluster) -> Client:
    return Client(real_cluster)


@pytest.fixture
def real_namespace(real_cluster: TestCluster) -> Iterator[str]:
    yield from new_namespace(real_cluster, "r")


@pytest.fixture(scope="session")
def real_controller(real_cluster: TestCluster) -> Iterator[Process]:
    proc = controller_process(real_cluster).start()
    wait_for_leader(real_cluster, proc)
    yield proc
    proc.stop()
