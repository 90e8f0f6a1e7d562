"""The server's half of staging (:mod:`.mount_stage`): which binds to stage, and where.

Everything a sandbox binds from outside the system (``/usr``, ``/etc``) is
staged when the server is root: the workspace and what lies in it, the
kernel's Python when it is not the system's, extra mounts, the kernel's own
files. The runtime gets its mounts back with those sources replaced by stage
paths, and a command prefix that runs the helper first.

gVisor (runsc as root) finds its stages in the sandbox's own directory. A
bubblewrap kernel of a root server sets up as the sandbox uid, which may not
cross the directories above the server's state (pytest's, a home): its stages
are in a private /tmp of the helper's mount namespace, and so is the empty file
that hides a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..identity import SandboxIdentity
from ..pyenv import is_within
from ..spec import Mount, MountKind

#: Trusted, read-only system trees: bound by path.
SYSTEM_TREES = ("/usr", "/etc")
HELPER = str(Path(__file__).with_name("mount_stage.py"))
#: Where a bubblewrap kernel's stages are, in the helper's private /tmp.
PRIVATE_STAGES = "/tmp/.jupyter-sandbox-stages"


@dataclass(frozen=True)
class Staging:
    """Mounts whose user sources were replaced by stages, and the prefix that makes them."""

    mounts: tuple[Mount, ...]
    prefix: tuple[str, ...] = ()
    #: The empty file that hides a file (HIDE_FILE), where the runtime can reach it.
    empty: str = ""


def needs_staging(mount: Mount) -> bool:
    return (
        mount.kind is MountKind.BIND
        and mount.source is not None
        and not any(is_within(mount.source, tree) for tree in SYSTEM_TREES)
    )


def stage(
    mounts: tuple[Mount, ...],
    state_dir: Path,
    *,
    identity: SandboxIdentity | None = None,
) -> Staging:
    """Plan a stage for every bind to stage. With ``identity`` (a bubblewrap kernel of a
    root server) the helper also makes the kernel's user namespace, id-maps every stage,
    puts them in a private /tmp, and becomes the sandbox uid."""
    private = identity is not None
    stage_dir = PRIVATE_STAGES if private else str(state_dir / "stage")
    entries: list[list] = []

    def point(source: str, name: str, readonly: bool) -> str:
        st = os.stat(source)
        target = os.path.join(stage_dir, name)
        entries.append([source, target, readonly, [st.st_dev, st.st_ino]])
        if not private:  # made now: runsc looks at what it will bind
            os.makedirs(stage_dir, mode=0o755, exist_ok=True)
            if os.path.isdir(source):
                os.makedirs(target, mode=0o755, exist_ok=True)
            else:
                Path(target).touch(mode=0o444, exist_ok=True)
        return target

    staged: list[Mount] = []
    for i, mount in enumerate(mounts):
        if needs_staging(mount):
            assert mount.source is not None
            mount = dataclasses.replace(
                mount, source=point(mount.source, str(i), not mount.writable)
            )
        staged.append(mount)
    empty = state_dir / "empty"
    if any(m.kind is MountKind.HIDE_FILE for m in mounts):
        empty.touch(mode=0o444, exist_ok=True)
        if private:
            empty = Path(point(str(empty), "empty", True))
    if not entries and identity is None:
        return Staging(tuple(staged), empty=str(empty))
    plan: dict = {"stages": entries}
    if identity is not None:
        plan.update(private_tmp=True, user=[identity.uid, identity.gid],
                    userns=identity.userns_maps(), idmap=identity.idmap_maps())  # fmt: skip
    prefix = (sys.executable, "-I", "-S", HELPER, json.dumps(plan), "--")
    return Staging(tuple(staged), prefix, str(empty))
