"""A real Kubernetes node on this machine: kubelet, containerd, runc, gVisor (test support).

The stand-in (:mod:`testcluster.node_agent`) runs a pod's command as a local process;
this runs pods the way operators' nodes do: the kubelet 1.20 built from the same source
as the API server, containerd 1.6 with its CRI, runc, the CNI bridge, kube-proxy in
iptables mode, and a ``gvisor`` RuntimeClass served by runsc through gVisor's own
containerd shim (built by ``scripts/build-test-cluster``; runsc runs as
``testcluster/runsc-for-pods``).

Everything the node does to the machine's network happens in a network namespace of
its own, so that the kubelet's firewall chain, kube-proxy's rules, the bridge and the
per-namespace sysctls (``ip_forward``, ``route_localnet``) never touch the host's or
other tests' loopback services. The node's processes share one mount namespace, so
that the kubelet's volume mounts are the ones containerd gives the containers and all
of them vanish with the node. In it the node has its own ``/run``, ``/var/lib`` and
``/var/log`` (the kubelet and containerd write pod logs, device-plugin sockets, the CNI
cache and shim sockets there whatever their configuration says, and a kubelet's
garbage collection deletes the pod logs it does not know: another node's), and the
global sysctls the kubelet sets (``vm.overcommit_memory``, ``kernel.panic`` ...) are
files holding the values it wants: the machine's are never changed. The host keeps
only a veth pair ``jsnode<N>`` to the namespace, with routes to the pods and Services,
and cgroups below ``/jsnode<N>`` (the kubelet's ``--cgroup-root``), which
:meth:`RealNode.stop` removes. A node that was not stopped (its test process killed)
is cleaned up by the next node to start, from the record it left in
``/run/jupyter-sandbox``. :func:`leftovers` says what a node left behind.

Each node takes a slot ``N`` (a lock file), which gives it its addresses: the link
``198.51.100.4N+1`` (host) / ``+2`` (node), pods ``10.244.N.0/24``, Services
``10.96.N.0/24``. These are documentation and private ranges no real network here uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testcluster import images
from testcluster.cluster import REPO, TestCluster

#: Where the nodes of this machine keep their records and the machine's snapshot.
RECORDS = Path("/run/jupyter-sandbox")
SLOTS = 32
#: The sysctls the kubelet 1.20 sets for the whole machine, and the values it wants: in the
#: node's mount namespace they are files holding these, so that it leaves the machine's.
KUBELET_SYSCTLS = {"vm.overcommit_memory": "1", "vm.panic_on_oom": "0", "kernel.panic": "10",
                   "kernel.panic_on_oops": "1", "kernel.keys.root_maxkeys": "1000000",
                   "kernel.keys.root_maxbytes": "25000000"}  # fmt: skip
#: Where the kubelet and containerd write whatever their configuration says: the node's own.
PRIVATE_DIRS = ("run", "var/lib", "var/log")
NODE_NAME = "real-node"


def _run(*argv: str, check: bool = True, input: str | None = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def sysctl(name: str) -> str:
    """The value of sysctl ``name`` (as this process's namespaces see it)."""
    return _sysctl_path(name).read_text().strip()


class Slot:
    """Slot ``index`` of the machine, held (a lock) for the life of one node."""

    def __init__(self, index: int, lock: Any):
        self.index, self._lock = index, lock
        n = index
        self.iface = f"jsnode{n}"
        self.host_ip, self.node_ip = f"198.51.100.{4 * n + 1}", f"198.51.100.{4 * n + 2}"
        self.pod_cidr, self.service_cidr = f"10.244.{n}.0/24", f"10.96.{n}.0/24"
        self.cgroup = f"jsnode{n}"
        self.record = RECORDS / f"realnode-{n}.json"

    @classmethod
    def take(cls) -> Slot:
        RECORDS.mkdir(mode=0o755, exist_ok=True)
        for index in range(SLOTS):
            lock = open(RECORDS / f"realnode-{index}.lock", "a")  # noqa: SIM115 (held)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            return cls(index, lock)
        raise RuntimeError(f"all {SLOTS} real-node slots of this machine are taken")

    def release(self) -> None:
        self._lock.close()


class RealNode:
    """One node: ``network_up()`` (before the cluster, whose API server listens on the
    node's link), then ``start(cluster)``, then ``stop()``."""

    def __init__(self, workdir: Path, bin_dir: Path, cache: Path):
        self.workdir, self.bin_dir, self.cache = workdir, bin_dir, cache
        self.slot: Slot | None = None
        self.holder: subprocess.Popen | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self.name = NODE_NAME
        self.socket = workdir / "containerd" / "containerd.sock"

    # -- the network ---------------------------------------------------------------------
    def network_up(self) -> Slot:
        self.workdir.mkdir(parents=True, exist_ok=True)
        slot = self.slot = Slot.take()
        # Nodes whose test process was killed before they stopped: this slot's, others'.
        if slot.record.exists():
            cleanup_record(slot.record)
        sweep_orphans()
        # The namespaces' holder: everything of the node joins its network and mount
        # namespaces (slave mounts: the host's mounts show inside, none of the node's out).
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "slave", "sleep", "infinity"],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while _ns(self.holder.pid, "net") in (None, _ns(os.getpid(), "net")):
            if time.monotonic() > deadline:
                raise RuntimeError("the node's namespaces did not appear")
            time.sleep(0.02)
        self._write_record()
        pid = str(self.holder.pid)
        self._private_views(pid)
        _run("ip", "link", "add", slot.iface, "type", "veth", "peer", "name", "eth0",
             "netns", pid)  # fmt: skip
        _run("ip", "addr", "add", f"{slot.host_ip}/30", "dev", slot.iface)
        _run("ip", "link", "set", slot.iface, "up")
        inside = ("nsenter", "-t", pid, "-n")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{slot.node_ip}/30", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        _run(*inside, "ip", "route", "add", "default", "via", slot.host_ip)
        # Pods reach the host and the host the pods through the node: forwarding in the
        # node's namespace only (the host is an end, not a router).
        _run(*inside, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for cidr in (slot.pod_cidr, slot.service_cidr):
            _run("ip", "route", "add", cidr, "via", slot.node_ip, "dev", slot.iface)
        return slot

    def _write_record(self) -> None:
        assert self.slot is not None and self.holder is not None
        # The holder's start time tells it from a process that got its pid later.
        record = {"holder": self.holder.pid, "started": _start_time(self.holder.pid),
                  "workdir": str(self.workdir), "iface": self.slot.iface,
                  "cgroup": self.slot.cgroup}  # fmt: skip
        tmp = self.slot.record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.slot.record)

    def _private_views(self, pid: str) -> None:
        """The node's own /run, /var/lib and /var/log, and the kubelet's sysctls as files
        holding the values it wants, in the node's mount namespace (see the module)."""
        views = self.workdir / "views"
        mounts = []
        for sub in PRIVATE_DIRS:
            (views / sub).mkdir(parents=True, exist_ok=True)
            mounts.append((views / sub, Path("/") / sub))
        for name, value in KUBELET_SYSCTLS.items():
            (views / "sysctl" / name).parent.mkdir(parents=True, exist_ok=True)
            (views / "sysctl" / name).write_text(value + "\n")
            mounts.append((views / "sysctl" / name, _sysctl_path(name)))
        script = " && ".join(f"mount --bind '{source}' '{target}'" for source, target in mounts)
        _run("nsenter", "-t", pid, "-m", "sh", "-ec", script)

    def make_cluster(self, workdir: Path) -> TestCluster:
        """The cluster of this node (not started): its API server on the host's end of the
        node's link, its Services in the node's range, the kubelet's identity known (a
        node of group system:nodes; :meth:`start` gives it the node role)."""
        assert self.slot is not None, "network_up() first"
        cluster = TestCluster(workdir, self.bin_dir, address=self.slot.host_ip,
                              service_range=self.slot.service_cidr, for_real_node=True)  # fmt: skip
        cluster.identities[f"system:node:{self.name}"] = (uuid.uuid4().hex, "system:nodes")
        return cluster

    # -- the node ------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        assert self.holder is not None
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
        self._procs[name] = subprocess.Popen(
            ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--", *argv],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        log.close()

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def runsc(self, *args: str) -> str:
        """runsc on the node's gVisor pods (their state is the shim's root)."""
        assert self.holder is not None
        return _run("nsenter", "-t", str(self.holder.pid), "-n", "-m", "--",
                    str(REPO / "testcluster/runsc-for-pods"), "--root",
                    str(self.workdir / "runsc" / "k8s.io"),
                    *args)  # fmt: skip

    def ctr(self, *args: str, check: bool = True) -> str:
        return _run("ctr", "--address", str(self.socket), "-n", "k8s.io", *args, check=check)

    def start(self, cluster: TestCluster) -> RealNode:
        assert self.slot is not None, "network_up() first"
        slot, work = self.slot, self.workdir
        for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "runc", "runsc", "runsc-logs",
                    "images"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        (work / "cni/net.d/10-jsnode.conflist").write_text(json.dumps(self._cni_config()))
        (work / "containerd/config.toml").write_text(self._containerd_config())
        # containerd finds gVisor's shim on its PATH.
        self._spawn("containerd", ["containerd", "--config", str(work / "containerd/config.toml")],
                    env={"PATH": f"{self.bin_dir}:{os.environ['PATH']}"})  # fmt: skip
        self._wait(lambda: self.socket.exists() and self.ctr("version", check=False), "containerd",
                   30)  # fmt: skip
        for tarball in (images.build_pause_image(self.bin_dir / "pause", work / "images"),
                        images.build_python_image(self.cache / "images", work / "images")):
            self.ctr("images", "import", "--no-unpack", str(tarball))
        _make_cgroups(slot.cgroup)
        user = f"system:node:{self.name}"
        (work / "kubelet.kubeconfig").write_text(json.dumps(
            _kubeconfig(cluster.server, user, cluster.identities[user][0])))  # fmt: skip
        (work / "admin.kubeconfig").write_text(json.dumps(
            _kubeconfig(cluster.server, "admin", cluster.token)))  # fmt: skip
        rbac = "rbac.authorization.k8s.io"
        status, body = cluster.request("POST", f"/apis/{rbac}/v1/clusterrolebindings", {
            "metadata": {"name": f"node-{self.name}"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": rbac, "kind": "User", "name": user}]})  # fmt: skip
        assert status in (201, 409), body
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"),
            f"--kubeconfig={work / 'kubelet.kubeconfig'}",
            f"--root-dir={work / 'kubelet'}", f"--cert-dir={work / 'kubelet/pki'}",
            f"--volume-plugin-dir={work / 'kubelet/volume-plugins'}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.socket}",
            "--runtime-request-timeout=5m",
            f"--hostname-override={self.name}", f"--node-ip={slot.node_ip}",
            "--cgroup-driver=cgroupfs", f"--cgroup-root=/{slot.cgroup}",
            "--fail-swap-on=false", "--read-only-port=0",
            # Imported images are never collected, and a busy disk evicts nothing.
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            "--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%",
            "--resolv-conf=/etc/resolv.conf", "--v=1",
        ])  # fmt: skip
        self._spawn("kube-proxy", [
            str(self.bin_dir / "kube-proxy"), f"--kubeconfig={work / 'admin.kubeconfig'}",
            f"--hostname-override={self.name}", "--proxy-mode=iptables",
            f"--cluster-cidr={slot.pod_cidr}",
            # nf_conntrack_max is the machine's: leave it alone.
            "--conntrack-max-per-core=0",
            "--metrics-bind-address=127.0.0.1:10249",
        ])  # fmt: skip
        self._wait(lambda: self._ready(cluster), "the node to be Ready", 90)
        self._wait(lambda: self._service_rules(), "kube-proxy's rules", 60)
        return self

    def local_volumes(self, cluster: TestCluster, prefix: str, count: int) -> list[Path]:
        """``count`` local PersistentVolumes of 10Gi on this node, as an administrator of a
        cluster without a storage provisioner makes them: directories of root's (the
        kubelet gives each to the fsGroup of the pod that mounts it)."""
        paths = []
        selector = {"key": "kubernetes.io/hostname", "operator": "In", "values": [self.name]}
        for i in range(count):
            path = self.workdir / "volumes" / f"{prefix}-{i}"
            path.mkdir(parents=True, mode=0o755)
            status, body = cluster.request("POST", "/api/v1/persistentvolumes", {
                "metadata": {"name": f"{prefix}-{i}"}, "spec": {
                    "capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain", "local": {"path": str(path)},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [
                        {"matchExpressions": [selector]}]}}}})  # fmt: skip
            assert status == 201, body
            paths.append(path)
        return paths

    def _ready(self, cluster: TestCluster) -> bool:
        status, node = cluster.request("GET", f"/api/v1/nodes/{self.name}")
        if status != 200:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in node.get("status", {}).get("conditions", []))  # fmt: skip

    def _service_rules(self) -> bool:
        assert self.holder is not None
        rules = _run("nsenter", "-t", str(self.holder.pid), "-n", "iptables", "-t", "nat",
                     "-S", "KUBE-SERVICES", check=False)  # fmt: skip
        return "default/kubernetes" in rules

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)}")
            with contextlib.suppress(OSError, RuntimeError):
                if ready():
                    return
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self.log(n)[-2500:]}" for n in self._procs)
        raise RuntimeError(f"timed out waiting for {what}\n{logs}")

    def _cni_config(self) -> dict[str, Any]:
        assert self.slot is not None
        return {"cniVersion": "0.4.0", "name": "jsnode", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(self.workdir / "cni/ipam"),
                      "ranges": [[{"subnet": self.slot.pod_cidr}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}  # fmt: skip

    def _containerd_config(self) -> str:
        work = self.workdir
        # runc through containerd's own shim; runsc through gVisor's (built from the source
        # of the machine's runsc), which runs runsc as testcluster/runsc-for-pods.
        (work / "runsc.toml").write_text(
            f'binary_name = "{REPO / "testcluster/runsc-for-pods"}"\n'
            f'root = "{work / "runsc"}"\n'
            f'log_path = "{work / "runsc-logs"}/%ID%/shim.log"\n'
            "[runsc_config]\n"
            f'  debug-log = "{work / "runsc-logs"}/%ID%/"\n'
        )
        runtimes = f"""
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  Root = "{work / 'runc'}"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc]
  runtime_type = "io.containerd.runsc.v1"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc.options]
  TypeUrl = "io.containerd.runsc.v1.options"
  ConfigPath = "{work / 'runsc.toml'}"
"""
        return f"""version = 2
root = "{work / 'containerd/root'}"
state = "{work / 'containerd/state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{work / 'containerd/ttrpc.sock'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{work / 'containerd/opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE_IMAGE}"
  # runc cannot lower oom_score_adj without CAP_SYS_RESOURCE (pods fail to start).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{work / 'cni/net.d'}"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
{runtimes}"""

    # -- stopping ------------------------------------------------------------------------
    def stop(self) -> None:
        """Everything of the node ends and goes; the machine is put back."""
        for name in ("kube-proxy", "kubelet"):
            proc = self._procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        if self.slot is not None and self.slot.record.exists():
            cleanup_record(self.slot.record)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        if self.holder is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.holder.wait(timeout=5)
        if self.slot is not None:
            self.slot.release()
            self.slot = None


@contextlib.contextmanager
def running(workdir: Path, bin_dir: Path, **start: Any) -> Iterator[tuple[TestCluster, RealNode]]:
    """A real node and its cluster (``start``: :meth:`TestCluster.start`'s arguments),
    stopped (and the machine put back) on the way out, whatever happened."""
    node = RealNode(workdir / "node", bin_dir, bin_dir.parent / "images")
    cluster = None
    try:
        node.network_up()
        cluster = node.make_cluster(workdir / "cluster")
        cluster.start(**start)
        node.start(cluster)
        yield cluster, node
    finally:
        node.stop()
        if cluster is not None:
            cluster.stop()


def _kubeconfig(server: str, user: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server,
                                                   "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": user}}],
            "current-context": "c"}  # fmt: skip


# -- what a node leaves on the machine ---------------------------------------------------------
def _unmount_below(path: Path) -> None:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((m for m in mounts if m == str(path) or m.startswith(f"{path}/")),
                         key=len, reverse=True):  # fmt: skip
        _run("umount", "-l", target, check=False)


def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), or None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _processes_of(holder: int, started: int | None, cgroup: str) -> set[int]:
    """The node's processes: in its namespaces, in its cgroups, or descended from one."""
    mnt, net = _ns(holder, "mnt"), _ns(holder, "net")
    # The holder's pid, taken since by another process (another node's, a sandbox's),
    # names no namespace of this node: then only its cgroups say which are its own.
    if started is None or _start_time(holder) != started:
        mnt = net = None
    found: set[int] = set()
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            cgroups = (entry / "cgroup").read_text()
        except (OSError, ValueError, IndexError):
            continue
        if (mnt and _ns(pid, "mnt") == mnt) or (net and _ns(pid, "net") == net) or (
            f":/{cgroup}/" in cgroups or cgroups.rstrip().endswith(f":/{cgroup}")
        ):
            found.add(pid)
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        grew = bool(more)
        found |= more
    found.discard(os.getpid())
    return found


def cleanup_record(record_path: Path) -> None:
    """End every process of the node the record names, remove its link, cgroups and work
    state. (Its mounts live in its own mount namespace: they go with its processes.)"""
    record = json.loads(record_path.read_text())
    holder, cgroup = int(record["holder"]), record["cgroup"]
    for _attempt in range(50):
        pids = _processes_of(holder, record.get("started"), cgroup)
        if not pids and not (Path("/sys/fs/cgroup/pids") / cgroup).exists():
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        _remove_cgroups(cgroup)
    _remove_cgroups(cgroup)
    _run("ip", "link", "del", record["iface"], check=False)
    work = Path(record["workdir"])
    for sub in ("containerd", "kubelet", "runc", "runsc", "runsc-logs", "cni", "views"):
        _unmount_below(work / sub)
        shutil.rmtree(work / sub, ignore_errors=True)
    record_path.unlink(missing_ok=True)


def _make_cgroups(cgroup: str) -> None:
    """The kubelet's --cgroup-root in every hierarchy (the kubelet wants it to exist);
    a cpuset gets its parent's CPUs and memory nodes, as a new one has none."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        if not (hierarchy / "cgroup.procs").exists():
            continue
        (hierarchy / cgroup).mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (hierarchy / name).exists():
                (hierarchy / cgroup / name).write_text((hierarchy / name).read_text())


def _remove_cgroups(cgroup: str) -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / cgroup
        if not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def _unheld_slots() -> Iterator[int]:
    """Each slot that no running node holds, locked while the caller looks at it."""
    for index in range(SLOTS):
        lock_path = RECORDS / f"realnode-{index}.lock"
        if not (lock_path.exists() or (RECORDS / f"realnode-{index}.json").exists()):
            continue  # never taken: nothing of a node there
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield index


def sweep_orphans() -> None:
    """Clean up every node whose test process ended without stopping it."""
    for index in _unheld_slots():
        record = RECORDS / f"realnode-{index}.json"
        if record.exists():
            cleanup_record(record)


def leftovers() -> list[str]:
    """What real nodes left on this machine that no running node owns."""
    found = []
    for index in _unheld_slots():
        if (RECORDS / f"realnode-{index}.json").exists():
            found.append(f"the record of node slot {index}")
        if Path(f"/sys/class/net/jsnode{index}").exists():
            found.append(f"link jsnode{index}")
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if (hierarchy / f"jsnode{index}").exists():
                found.append(f"cgroup {hierarchy.name}/jsnode{index}")
    return found
