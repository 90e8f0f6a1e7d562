"""The syscall filter for bubblewrap sandboxes (a deny-list, as Flatpak's).

gVisor needs none: its own kernel (the Sentry) handles every syscall. For
bubblewrap the host kernel is the attack surface, so calls that a kernel
process never needs and that widen it are refused: new namespaces and mounts,
kernel modules and keyrings, BPF, perf, io_uring, ptrace and kcmp, personality
flags that weaken the address space (no ASLR, executable reads), TIOCSTI, and
socket families other than unix, inet, inet6 and netlink. Built with libseccomp
through ``pyseccomp``, once per process.

Every process of a sandbox carries it. A pooled sandbox's agent starts under
the *agent* variant, which still allows the mount calls it needs to bind its
kernel's workspace (and unshare, for its zygote's pid namespace), and adds the
full filter (filters stack) once it has; the zygote loads the full filter
before it forks any kernel.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import tempfile
from typing import Any

import pyseccomp as seccomp

DENIED_SYSCALLS = (
    "_sysctl", "acct", "add_key", "adjtimex", "bpf", "chroot", "clock_adjtime",
    "clock_settime", "create_module", "delete_module", "finit_module", "fsconfig",
    "fsmount", "fsopen", "fspick", "get_kernel_syms", "init_module", "io_uring_enter",
    "io_uring_register", "io_uring_setup", "ioperm", "iopl", "kexec_file_load",
    "kcmp", "kexec_load", "keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace", "query_module",
    "quotactl", "quotactl_fd", "reboot", "request_key", "setns", "settimeofday",
    "swapoff", "swapon", "syslog", "umount2", "unshare", "uselib", "userfaultfd",
    "ustat", "vhangup",
)  # fmt: skip

_ALLOWED_FAMILIES = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK}
_AF_MAX = 46
_CLONE_NEWUSER = 0x10000000
_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | _CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
#: What a pooled sandbox's agent may still call until its kernel's workspace is bound:
#: mounts, and a pid namespace for its zygote (clone flags are checked apart, below).
AGENT_CALLS = ("mount", "umount2", "open_tree", "move_mount", "mount_setattr", "unshare")
#: personality(2) flags that weaken the address space: no ASLR, a mapping at address 0,
#: the legacy layout, executable reads, 32-bit and 3 GB address limits. A filter compares
#: each argument once, so the query (0xffffffff, every bit set) is refused as well.
_WEAK_PERSONAS = (0x0040000, 0x0100000, 0x0200000, 0x0400000, 0x0800000, 0x8000000)


def build_filter(agent: bool = False) -> Any:
    """The filter as a libseccomp object (``.load()`` applies it to the calling process);
    ``agent``: the pooled agent's variant, mounts still allowed."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        if agent and name in AGENT_CALLS:
            continue
        try:
            f.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a syscall on this architecture
    for flag in (1 << i for i in range(32) if _NAMESPACE_FLAGS & (1 << i)):
        f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc use clone.
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in _WEAK_PERSONAS:
        f.add_rule(deny, "personality", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    for request in (_TIOCSTI, _TIOCLINUX):
        f.add_rule(deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    no_family = seccomp.ERRNO(errno.EAFNOSUPPORT)
    for family in range(_AF_MAX):
        if family not in _ALLOWED_FAMILIES:
            f.add_rule(no_family, "socket", seccomp.Arg(0, seccomp.EQ, family))
    f.add_rule(no_family, "socket", seccomp.Arg(0, seccomp.GE, _AF_MAX))
    return f


@functools.lru_cache(maxsize=2)
def filter_bpf(agent: bool = False) -> bytes:
    """The compiled BPF program, as bubblewrap's ``--seccomp FD`` reads it."""
    with tempfile.TemporaryFile() as out:
        build_filter(agent).export_bpf(out)
        out.seek(0)
        return out.read()


def filter_fd(agent: bool = False) -> int:
    """A readable file descriptor holding the filter; the caller closes it after launch."""
    fd = os.memfd_create("jupyter-sandbox-seccomp", 0)
    os.write(fd, filter_bpf(agent))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
