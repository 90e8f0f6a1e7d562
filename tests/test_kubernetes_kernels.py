"""Kernels in claimed Sandboxes: the provisioner's kubernetes runtime on the real test cluster.

The pool's template is the shipped ``jupyter_config/kubernetes/python-gvisor.yaml``
(its controller key replaced by a test key); the node agent runs its pods as
local gVisor sandboxes, each on its own 127/8 address, with the kernel agent as
the container's command.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml
from cluster_fixtures import condition, wait_for
from conftest import KERNEL_AGE, Kernel, async_wait_until
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from test_notebooks import NOTEBOOKS, outputs, stdout

from agent_sandbox import api
from agent_sandbox.kube import CLAIMS, PODS, SANDBOXES, TEMPLATES, WARM_POOLS
from sandbox_provisioner.agent.client import AgentClient
from sandbox_provisioner.agent.protocol import (
    ProtocolError,
    Refused,
    load_or_create_signing_key,
    public_key_text,
)
from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager
from testcluster.cluster import REPO

pytestmark = pytest.mark.usefixtures("controller")
MANIFEST = REPO / "jupyter_config" / "kubernetes" / "python-gvisor.yaml"
POOL = "python-gvisor"
REPLICAS = 2


def shipped_manifests(public_key: str, **container_fields) -> list[dict]:
    """The shipped template and pool, with this test's controller key pinned (and
    ``container_fields`` set on the kernel's container)."""
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    template, pool = docs
    container = template["spec"]["podTemplate"]["spec"]["containers"][0]
    for var in container["env"]:
        if var["name"] == "JUPYTER_SANDBOX_CONTROLLER_KEYS":
            var["value"] = public_key
    container.update(container_fields)
    pool["spec"]["replicas"] = REPLICAS
    return [template, pool]


def members(k8s, ns: str) -> list[dict]:
    selector = f"{api.LABEL_WARM_POOL_SANDBOX}={api.name_hash(POOL)}"
    return k8s.list(SANDBOXES, ns, selector)


def ready_members(k8s, ns: str) -> list[dict]:
    """Members whose agent listens (the template's readiness probe)."""
    return [
        m
        for m in members(k8s, ns)
        if condition(m, "Ready").get("status") == "True"
        and not m["metadata"].get("deletionTimestamp")
    ]


def make_pool(k8s, namespace: str, cluster, tmp_path: Path, **container_fields) -> dict:
    """A warm pool of kernel sandboxes in ``namespace``, waited for; the kernelspec config
    to use it."""
    key_file = tmp_path / "controller-key.pem"
    public = public_key_text(load_or_create_signing_key(key_file))
    template, warm_pool = shipped_manifests(public, **container_fields)
    k8s.create(TEMPLATES, namespace, {k: template[k] for k in ("metadata", "spec")})
    k8s.create(WARM_POOLS, namespace, {k: warm_pool[k] for k in ("metadata", "spec")})
    wait_for(lambda: len(ready_members(k8s, namespace)) == REPLICAS, 120, "a warm pool")
    return {
        "warm_pool": POOL,
        "namespace": namespace,
        "kubeconfig": str(cluster.kubeconfig),
        "controller_key_file": str(key_file),
        "server_id": f"test-{namespace}",
    }


@pytest.fixture
def pool(k8s, namespace, cluster, tmp_path) -> dict:
    return make_pool(k8s, namespace, cluster, tmp_path)


async def start(start_kernel, pool: dict, **extra) -> Kernel:
    return await start_kernel("kubernetes", **pool, **extra)


def claims_of(k8s, ns: str, kernel: Kernel) -> list[dict]:
    return k8s.list(CLAIMS, ns, f"{api.LABEL_KERNEL_ID}={kernel.km.kernel_id}")


async def test_kernel_from_warm_pool(k8s, namespace, pool, start_kernel):
    warm = {m["metadata"]["name"] for m in ready_members(k8s, namespace)}
    await asyncio.sleep(3)
    kernel = await start(start_kernel, pool)
    # The kernel was prepared when its pod booted (the template's --prepare), not forked
    # when it was claimed.
    assert await kernel.value(KERNEL_AGE) > 2
    sandbox = kernel.provisioner()._sandbox
    # An adopted pool member keeps the pool's name; the claim says which one it is.
    assert sandbox.sandbox_name in warm
    (claim,) = claims_of(k8s, namespace, kernel)
    assert claim["status"]["sandbox"]["name"] == sandbox.sandbox_name
    labels = claim["metadata"]["labels"]
    assert labels[api.LABEL_KERNEL_SERVER] == api.unique_label_value(f"test-{namespace}")
    notes = claim["metadata"]["annotations"]
    assert notes[api.LABEL_KERNEL_SERVER] == f"test-{namespace}"
    assert notes[api.LABEL_KERNEL_USER] and claim["metadata"]["name"].startswith("kernel-")
    assert labels[api.LABEL_KERNEL_USER]
    pod = k8s.get(PODS, namespace, sandbox.sandbox_name)
    assert pod["metadata"]["labels"][api.POD_LABEL_KERNEL_ID] == kernel.km.kernel_id
    assert pod["metadata"]["labels"][api.LABEL_LAUNCH_TYPE] == api.LAUNCH_WARM
    # ZMQ goes to the pod's own address.
    assert kernel.km.ip == claim["status"]["sandbox"]["podIPs"][0] == pod["status"]["podIP"]
    result = await kernel.run("import os; print(6 * 7, os.environ['JUPYTER_SANDBOX_RUNTIME'])")
    assert result.stdout.split() == ["42", "kubernetes"]
    # The controller key never reaches the kernel; the allowlisted environment does.
    env = await kernel.value("dict(os.environ)")
    assert "JUPYTER_SANDBOX_CONTROLLER_KEYS" not in env
    reply = await kernel.kc.kernel_info(reply=True, timeout=30)
    assert f"Sandboxed kernel: kubernetes, pool {POOL} (warm start)" in reply["content"]["banner"]


async def test_interrupt_restart_in_place_and_shutdown(k8s, namespace, pool, start_kernel):
    kernel = await start(start_kernel, pool)
    sandbox_name = kernel.provisioner()._sandbox.sandbox_name
    (claim,) = claims_of(k8s, namespace, kernel)

    msg_id = kernel.kc.execute("import time\nwhile True:\n    time.sleep(0.01)")
    await asyncio.sleep(1.0)
    await kernel.km.interrupt_kernel()
    reply = await kernel.reply(msg_id)
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    assert (
        await kernel.run("x = 41; import subprocess; p = subprocess.Popen(['sleep', '600'])")
    ).ok
    old_pid = await kernel.value("os.getpid()")
    await kernel.km.restart_kernel()
    await kernel.ready()
    assert (await kernel.run("print(x)")).error.get("ename") == "NameError"
    # Same claim, same sandbox: restarted in place, with nothing left of the old kernel.
    (after,) = claims_of(k8s, namespace, kernel)
    assert after["metadata"]["uid"] == claim["metadata"]["uid"]
    assert kernel.provisioner()._sandbox.sandbox_name == sandbox_name
    assert await kernel.value("os.getpid()") != old_pid
    procs = await kernel.value("[open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') "
                               "if p.isdigit()]")  # fmt: skip
    assert not any(cmd.startswith("sleep") for cmd in procs), procs
    reply = await kernel.kc.kernel_info(reply=True, timeout=30)
    assert "(restarted in place)" in reply["content"]["banner"]

    await kernel.stop()
    wait_for(lambda: not claims_of(k8s, namespace, kernel), 30, "the claim to go")
    wait_for(lambda: k8s.get(SANDBOXES, namespace, sandbox_name) is None, 60, "the sandbox to go")
    wait_for(lambda: len(ready_members(k8s, namespace)) == REPLICAS, 120, "the pool to refill")


async def test_crash_is_detected_and_restarted(k8s, namespace, pool, start_kernel):
    kernel = await start(start_kernel, pool, autorestart=True)
    sandbox_name = kernel.provisioner()._sandbox.sandbox_name
    restarted = asyncio.Event()
    kernel.km.add_restart_callback(restarted.set, "restart")
    kernel.kc.execute("import os; os._exit(3)")
    await asyncio.wait_for(restarted.wait(), 30)
    await kernel.ready()
    assert (await kernel.run("print('back')")).stdout.strip() == "back"
    assert kernel.provisioner()._sandbox.sandbox_name == sandbox_name

    # The whole sandbox going away (its pod deleted) is a dead kernel too.
    k8s.delete(PODS, namespace, sandbox_name)
    assert await async_wait_until(lambda: kernel.km.provisioner.poll(), timeout=60)


async def test_impostors_are_refused(k8s, namespace, pool, start_kernel, tmp_path):
    # An unclaimed warm sandbox refuses a controller key it does not pin.
    member = ready_members(k8s, namespace)[0]
    ip = member["status"]["podIPs"][0]
    stranger = load_or_create_signing_key(tmp_path / "stranger.pem")
    with pytest.raises(Refused, match="not signed by a controller key"):
        await _retry_refused(lambda: AgentClient.claim((ip, 8900), stranger))

    kernel = await start(start_kernel, pool)
    sandbox = kernel.provisioner()._sandbox
    own_key = load_or_create_signing_key(pool["controller_key_file"])
    # Even the right key cannot take a claimed sandbox over, nor can a made-up session.
    with pytest.raises(Refused, match="already claimed"):
        await AgentClient.claim((sandbox.ip, 8900), own_key)
    with pytest.raises(Refused, match="not this sandbox's controller"):
        await AgentClient.resume((sandbox.ip, 8900), b"\0" * 32)
    # Garbage and forged frames are dropped; the kernel is untouched.
    reader, writer = await asyncio.open_connection(sandbox.ip, 8900)
    await reader.readline()
    writer.write(b'{"op": "claim", "pub": "AAAA", "sig": "AAAA"}\n')
    await writer.drain()
    assert b"refused" in await reader.readline()
    writer.close()
    client = await AgentClient.resume((sandbox.ip, 8900), sandbox.session)
    client._channel._key = b"\1" * 32  # frames MACed with the wrong key
    with pytest.raises((ProtocolError, ConnectionError)):
        await client.request("signal", signum=int(signal.SIGKILL))
    # So is the kernel itself: it cannot reach its agent's session.
    assert (await kernel.run("print('unharmed')")).stdout.strip() == "unharmed"


async def test_a_claimed_kernel_holds_no_session_key(pool, start_kernel):
    """The review's attack: walk the kernel's own objects to its agent's session (it was a
    fork of the agent), then resume the agent over TCP with it. The kernel is a fork of the
    zygote now, which never held the session: nothing to find, nothing to resume with."""
    kernel = await start(start_kernel, pool)
    sandbox = kernel.provisioner()._sandbox
    digest = hashlib.sha256(sandbox.session).hexdigest()
    found = await kernel.value(
        "[type(o).__name__ for o in __import__('gc').get_objects() "
        "if type(o).__name__ in ('KernelAgent', 'Channel', 'Handshake', 'Zygote') or "
        f"(isinstance(o, bytes) and len(o) == 32 and __import__('hashlib').sha256(o).hexdigest()"
        f" == {digest!r})]"
    )
    assert found == []
    # From inside the pod, the agent answers a resume only to its controller.
    result = await kernel.run(
        "import socket, json\n"
        f"s = socket.create_connection(({sandbox.ip!r}, 8900), timeout=5)\n"
        "f = s.makefile('rwb')\n"
        "greeting = json.loads(f.readline())\n"
        "f.write(b'{\"op\": \"resume\", \"proof\": \"' + b'A' * 44 + b'\"}\\n'); f.flush()\n"
        "print(f.readline().decode())"
    )
    assert "not this sandbox's controller" in result.stdout, result


async def _retry_refused(connect):
    """The member may still be starting its agent: retry until it answers."""
    for _ in range(100):
        try:
            return await connect()
        except (ConnectionError, OSError):
            await asyncio.sleep(0.1)
    return await connect()


async def test_server_restart_reconnects(k8s, namespace, pool, start_kernel):
    from jupyter_client.ioloop import AsyncIOLoopKernelManager

    kernel = await start(start_kernel, pool)
    assert (await kernel.run("kept = 'state'")).ok
    info = await kernel.provisioner().get_provisioner_info()
    json.dumps(info)  # persisted by kernel managers that reconnect: must be JSON
    connection = kernel.km.get_connection_info()

    km = AsyncIOLoopKernelManager(kernel_name="sandboxed-kubernetes")
    km.load_connection_info(connection)
    km.kernel_id = kernel.km.kernel_id
    from jupyter_client.provisioning import KernelProvisionerFactory

    km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, kernel.km.kernel_spec, parent=km
    )
    await km.provisioner.load_provisioner_info(info)
    assert await km.provisioner.poll() is None
    again = Kernel(km)
    assert await again.value("kept") == "state"
    await km.provisioner.kill()
    await km.provisioner.cleanup()
    wait_for(lambda: not claims_of(k8s, namespace, kernel), 30, "the claim to go")
    again.kc.stop_channels()


CRASHING_SERVER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from sandbox_provisioner.kernelspecs import RuntimeKernelSpecManager

    async def main():
        ksm = RuntimeKernelSpecManager()
        ksm.overrides = {"sandboxed-kubernetes": json.loads(sys.argv[1])}
        km = AsyncIOLoopKernelManager(kernel_name="sandboxed-kubernetes",
                                      kernel_spec_manager=ksm)
        await km.start_kernel()
        print(km.kernel_id, flush=True)
        if sys.argv[2] == "crash":
            os._exit(0)  # no shutdown: the claim stays behind
        await km.shutdown_kernel(now=True)

    asyncio.run(main())
    """
)


def run_server(pool: dict, mode: str, log: list[str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CRASHING_SERVER, json.dumps(pool), mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    if log is not None:
        log.append(out.stderr[-3000:])
    return out.stdout.split()[0]


async def test_claims_of_a_crashed_server_are_swept(k8s, namespace, pool):
    crashed = await asyncio.to_thread(run_server, pool, "crash")
    left = k8s.list(CLAIMS, namespace, f"{api.LABEL_KERNEL_ID}={crashed}")
    assert len(left) == 1
    # Claims of another server are none of this server's business.
    other = {**pool, "server_id": f"other-{namespace}"}
    other_kernel = await asyncio.to_thread(run_server, other, "crash")
    # The server starts again: its first kernel start deletes what the crash left.
    log: list[str] = []
    await asyncio.to_thread(run_server, pool, "clean", log)
    try:
        wait_for(lambda: not k8s.list(CLAIMS, namespace, f"{api.LABEL_KERNEL_ID}={crashed}"),
                 90, "the crashed server's claim to go")  # fmt: skip
    except AssertionError:  # what the claim and the server's sweep were, for the failure
        claims = k8s.list(CLAIMS, namespace, f"{api.LABEL_KERNEL_ID}={crashed}")
        raise AssertionError(f"claim left: {[c['metadata'] for c in claims]}\n"
                             f"the clean server's log: {log}") from None
    assert k8s.list(CLAIMS, namespace, f"{api.LABEL_KERNEL_ID}={other_kernel}")


async def test_bad_pool_is_a_clear_error(pool, start_kernel):
    from sandbox_provisioner.runtimes.kubernetes import ClaimFailed

    with pytest.raises(ClaimFailed, match="WarmPoolNotFound"):
        await start(start_kernel, {**pool, "warm_pool": "no-such-pool"})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
async def test_notebooks_run_on_the_cluster(pool, path: Path):
    ksm = RuntimeKernelSpecManager()
    ksm.overrides = {"sandboxed-kubernetes": pool}
    km = AsyncKernelManager(kernel_name="sandboxed-kubernetes", kernel_spec_manager=ksm)
    nb = nbformat.read(path, as_version=4)
    await NotebookClient(nb, km=km, timeout=120).async_execute()  # raises on an error output
    text = stdout(nb)
    if path.stem == "data-analysis":
        assert "sandbox runtime: kubernetes" in text
        assert any("image/png" in o["data"] for o in outputs(nb, "display_data"))
    else:  # the test cluster has no network isolation (host network): check the files part
        assert "ALLOWED  read the host /etc/shadow" not in text, text
        assert "ALLOWED  write into /usr" not in text, text
