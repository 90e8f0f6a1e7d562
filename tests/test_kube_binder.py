"""Binder links on the Hub on Kubernetes (the test cluster: a real kube-apiserver and etcd,
the stand-in node running pods in local sandboxes): the preparation in a pod on the cache
volume, a named server per repository whose pod mounts the prepared environment and
copies the commit into its own home once, the second launch cached and the user's
changes kept across a hibernation.

What cannot run here: a NetworkPolicy is not enforced on the stand-in node (pods share
the host's network), so the preparation's only way out is tried at the proxy (its
refusals), as in tests/test_binder_prepare.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from binder_fixtures import launch, serve_demo, server_of, spec
from hub_fixtures import Hub, start_kube_hub

from agent_sandbox.kube import SANDBOXES, Kube
from testcluster.cluster import free_port

CLAIM = "jupyter-sandbox-binder-cache"  # the default, of kubernetes/binder.yaml


@pytest.fixture(scope="module")
def binder_kube_hub(tmp_path_factory, cluster, node_agent) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("kube-binder")
    git, index = serve_demo(root)
    proxy_port = free_port()
    # The namespace is the Hub's own, made by start_kube_hub; its cache volume's directory
    # on the stand-in node is where the Hub (outside the cluster here) sees it.
    # The shipped configuration turns Binder links on when the Hub sees the cache volume
    # (here the stand-in node's directory of the Hub namespace's claim); the rest is this
    # machine's: the loopback repository and index, the proxy's port, no runtime class.
    extra = f"""
c.JupyterHub.services[0]["command"] += [
    "--binder-runtime-class=", "--binder-proxy-listen=127.0.0.1:{proxy_port}",
    "--binder-proxy-address=127.0.0.1:{proxy_port}", "--binder-pod-python={sys.executable}",
    "--binder-allowed-hosts=127.0.0.1", "--binder-index-url={index.url}/simple/",
    "--binder-egress=", "--binder-profile=plain"]
"""
    cache = f"{cluster.workdir}/node/pvc/{{namespace}}/{CLAIM}"
    env = {"JUPYTER_SANDBOX_BINDER_CACHE": cache, "JUPYTER_SANDBOX_SINGLEUSER_IMAGE": "unused:1"}
    hub = start_kube_hub(tmp_path_factory, cluster, extra_config=extra, env=env)
    hub.repo_url = f"{git.url}/demo.git"  # type: ignore[attr-defined]
    yield hub
    hub.close()
    cluster.request("DELETE", f"/api/v1/namespaces/{hub.namespace}")  # type: ignore[attr-defined]
    git.close()
    index.close()


async def test_a_link_opens_in_a_sandbox_on_the_cluster(binder_kube_hub: Hub, cluster):
    hub = binder_kube_hub
    await hub.api("POST", "/users/kay", raise_error=False)
    token = await hub.user_token("kay")
    events = await launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
    log = "\n".join(e["message"] for e in events)
    assert events[-1]["phase"] == "ready", log
    assert "Preparing in the pod binder-prepare-" in log and "running postBuild" in log, log
    user, server = server_of(events[-1])
    assert user == "kay" and server.startswith("b-demo-")
    out = await hub.execute(f"kay/{server}", token,
                            "import demo_pkg, os; print(demo_pkg.VALUE, os.getcwd())")  # fmt: skip
    assert out.split() == ["from", "the", "index", "/home/jovyan"], out
    # The server's pod: the prepared environment and the commit, read-only, from the cache
    # volume; the repository's files copied into the server's own home.
    kube = await Kube.connect(str(cluster.kubeconfig))
    try:
        sandboxes = await kube.list(SANDBOXES, hub.namespace)  # type: ignore[attr-defined]
    finally:
        await kube.close()
    (sandbox,) = [s for s in sandboxes if server in s["metadata"]["name"]]
    pod = sandbox["spec"]["podTemplate"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]
              if m["name"] == "binder-cache"}  # fmt: skip
    assert set(mounts) == {"/srv/binder", "/srv/binder-repo"}
    assert all(m["readOnly"] for m in mounts.values())
    runs = await hub.server_api(f"kay/{server}", token, "GET", "/api/contents/postbuild-runs.txt")
    assert runs["content"].split() == ["ran"]
    await hub.server_api(f"kay/{server}", token, "PUT", "/api/contents/mine.txt",
                         {"type": "file", "format": "text", "content": "kept"})  # fmt: skip
    # Hibernated, then launched again: cached, the same home with the change.
    await hub.api("DELETE", f"/users/kay/servers/{server}")
    events = await launch(hub, "git", spec(hub.repo_url), token)  # type: ignore[attr-defined]
    assert events[-1]["phase"] == "ready", events
    assert any(e.get("cached") for e in events), events
    mine = await hub.server_api(f"kay/{server}", token, "GET", "/api/contents/mine.txt")
    assert mine["content"] == "kept"


def test_the_shipped_binder_objects_apply_and_match(cluster, namespace):
    """kubernetes/binder.yaml is accepted by the API server as documented; its claim is the
    one the spawner and the service use by default, and its NetworkPolicy selects the
    preparation pods by the label they carry."""
    from pathlib import Path

    import yaml

    from sandbox_spawner.binder.kube_prepare import COMPONENT, COMPONENT_LABEL
    from sandbox_spawner.binder.web import add_arguments
    from sandbox_spawner.kubernetes import SandboxSpawner

    shipped = Path(__file__).resolve().parent.parent / "jupyter_config" / "kubernetes"
    objects = list(yaml.safe_load_all((shipped / "binder.yaml").read_text()))
    paths = {"PersistentVolumeClaim": f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
             "NetworkPolicy": f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"}
    for obj in objects:
        status, body = cluster.request("POST", paths[obj["kind"]], obj)
        assert status == 201, body
    claim, policy = objects
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["name"] == SandboxSpawner.binder_cache_claim.default_value
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_argument_group())
    assert parser.parse_args([]).binder_claim == claim["metadata"]["name"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {COMPONENT_LABEL: COMPONENT}
    (rule,) = policy["spec"]["egress"]
    assert rule["ports"] == [{"port": 8899, "protocol": "TCP"}]
    assert parser.parse_args([]).binder_proxy_listen.endswith(":8899")
