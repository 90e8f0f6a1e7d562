"""Who a sandboxed kernel is on the host: never root, and not the server's user when that is root.

A kernel whose host uid is 0 counts as root for every permission check on a
host file it can reach, capabilities or not: /proc/sys/kernel/core_pattern
(which the host runs on a crash), root's own files, /etc/ssl/private. So when
the server runs as root, kernels run as a dedicated unprivileged *sandbox
uid* instead: the ``jupyter-sandbox`` account when it exists (``scripts/setup``
creates it), else uid 65533 (in the range Debian keeps unallocated). Files a
kernel creates belong to that uid on disk; git, run by the server's user,
refuses a repository the kernel made ("dubious ownership").

The kernel still needs to read and write the server's files in its workspace.
How it gets that power, and only there, is each runtime's business:
bubblewrap maps the server's uid to an *alias* in id-mapped views of those
directories and gives the kernel CAP_DAC_OVERRIDE inside its own user
namespace (:mod:`.runtimes.userns_stage`); gVisor gives it CAP_DAC_OVERRIDE
inside the Sentry, which is the boundary.

An unprivileged server cannot switch uids: its kernels run as the server's
uid (in a user namespace of their own), which was never root.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

#: The account that owns what sandboxed kernels create, when it exists.
SANDBOX_ACCOUNT = "jupyter-sandbox"
#: The sandbox uid (and gid) when there is no such account.
FALLBACK_UID = 65533
#: The id the server's files appear as in a kernel's user namespace: the overflow uid,
#: which owns no files (unmapped ids look the same).
ALIAS = 65534
#: The kernel's uid inside a bubblewrap sandbox ("sandbox" in its /etc/passwd).
INSIDE_UID = 65534


@dataclass(frozen=True)
class SandboxIdentity:
    """The host ids a sandbox runs with."""

    #: Host uid and gid of the kernel, and owner of the files it creates.
    uid: int
    gid: int
    #: The server's own uid and gid (what the kernel's workspace mostly belongs to).
    server_uid: int
    server_gid: int

    @property
    def separate(self) -> bool:
        """Whether kernels run as a uid of their own (the server is root)."""
        return self.uid != self.server_uid

    def userns_maps(self) -> dict[str, str]:
        """The kernel's user namespace (bubblewrap): inside 0 is the alias, 65534 the kernel."""
        return {
            "uid": f"0 {ALIAS} 1\n{INSIDE_UID} {self.uid} 1\n",
            "gid": f"0 {ALIAS} 1\n{INSIDE_UID} {self.gid} 1\n",
        }

    def idmap_maps(self) -> dict[str, str]:
        """The id-mapped views: the server's files appear as the alias, the kernel's own
        files as themselves (so what it creates is stored as the sandbox uid)."""
        return {
            "uid": f"{self.server_uid} {ALIAS} 1\n{self.uid} {self.uid} 1\n",
            "gid": f"{self.server_gid} {ALIAS} 1\n{self.gid} {self.gid} 1\n",
        }


def resolve(user: str = "auto") -> SandboxIdentity:
    """The identity for ``user`` (``auto``, an account name or a number).

    ``auto`` is the ``jupyter-sandbox`` account, else uid 65533. An unprivileged server
    always runs kernels as itself. ValueError names what is wrong."""
    server_uid, server_gid = os.getuid(), os.getgid()
    if server_uid != 0:
        return SandboxIdentity(server_uid, server_gid, server_uid, server_gid)
    text = str(user).strip()
    if text in ("", "auto"):
        try:
            account = pwd.getpwnam(SANDBOX_ACCOUNT)
            uid, gid = account.pw_uid, account.pw_gid
        except KeyError:
            uid = gid = FALLBACK_UID
    elif text.isdigit():
        uid = gid = int(text)
    else:
        try:
            account = pwd.getpwnam(text)
        except KeyError:
            raise ValueError(f"invalid sandbox_user {text!r}: no such account") from None
        uid, gid = account.pw_uid, account.pw_gid
    if uid == 0 or gid == 0 or uid == ALIAS:
        raise ValueError(f"invalid sandbox_user {text!r}: kernels must not run as uid {uid} "
                         f"(root or the overflow uid {ALIAS})")  # fmt: skip
    return SandboxIdentity(uid, gid, server_uid, server_gid)
