"""What makes one Hub's names its own on a machine that other Hubs (and labs, and test
runs) share: its instance id, its range of host uids, and keys made from user names.

Names a Hub takes on the machine outlive a single server and are seen by every other
Hub: cgroups, gVisor container ids, host uids. Made from the JupyterHub user id
alone, user 3 of one Hub and user 3 of another were one and the same to the kernel:
stopping one killed what was left in "both" groups, and each could signal the other.
So:

* each Hub has an **instance id**, kept in its state root (``hub.json``), part of every
  cgroup and container name of its servers (:meth:`HubInstance.sandbox_name`);
* each Hub run as root has a **range of host uids** of its own, ``uid_base`` to
  ``uid_base + UID_RANGE - 1``, recorded machine-wide in a registry (``<data
  root>/hubs``, one file per range naming the Hub's state root). A range stays with its
  Hub as long as the Hub's state root does (a stopped Hub's users keep their uids, and
  their homes); a second Hub is never given it, and a configured ``uid_base`` that
  overlaps a range another Hub holds is refused;
* in its range, each **account** gets a uid of its own, never given again
  (:meth:`HubInstance.account_uid`): not ``uid_base`` + the user's id, as JupyterHub's
  database may give a deleted user's id to the next user (SQLite does), who then had
  the deleted one's uid, and their home if they took the name;
* a running Hub holds its state root and its homes' directory (a lock): a second Hub
  configured with either is refused, not merged with the first;
* user and server names become directory names through :func:`slug`, an escaping that
  cannot map two names to one (percent-encoding).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

#: Users one Hub can have (by id), and where ranges start and end (uid_t -1 is no uid).
UID_RANGE = 1 << 20
#: Below this offset, the uids of homes made before accounts had uids of their own
#: (``uid_base`` + the user's id); accounts get theirs from here up.
ACCOUNTS_FROM = 1 << 19
FIRST_BASE = 1_000_000_000
LAST_BASE = (1 << 32) - 2 - UID_RANGE
STATE_FILE = "hub.json"
_ID_CHARS = frozenset("0123456789abcdef")
_PLAIN = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class HubConflict(RuntimeError):
    """This Hub would share names or uids with another Hub; the message says what to do."""


def slug(name: str) -> str:
    """A directory name for a JupyterHub user or server name that no other name has:
    ASCII letters, digits, ``-``, ``_`` and ``.`` stay, everything else is percent-encoded
    (``%`` too), and a leading ``.`` is, so that no name is ``.``, ``..`` or hidden."""
    text = quote(name, safe="-_.")
    return "%2E" + text[1:] if text.startswith(".") else text


def server_key(name: str) -> str:
    """A short key for a server name, usable in cgroup and gVisor container names: the name
    itself when it is short and plain, else ``+`` and a digest (``+default``: the default
    server); ``+`` is in no plain name, so no two servers of a user share a key."""
    if not name:
        return "+default"
    if _PLAIN.fullmatch(name):
        return name
    return "+" + hashlib.sha256(name.encode()).hexdigest()[:16]


def legacy_slug(name: str) -> str:
    """The directory name before :func:`slug` (``-<hex>-`` escapes, ``-`` kept): two names
    could share one ("josé" and "jos-e9-"). Only for finding homes made with it."""
    return "".join(
        c if (c.isascii() and c.isalnum()) or c in "-_." else f"-{ord(c):x}-" for c in name
    ) or "-"


@dataclass(frozen=True)
class HubInstance:
    """One Hub's identity on this machine."""

    id: str
    #: The first host uid of its users (None: not root, every server runs as the Hub's uid).
    uid_base: int | None
    state_root: Path
    #: The locks this Hub holds on its state root and homes' directory, for its life.
    locks: tuple[int, ...] = ()

    def account_uid(self, name: str, created: str, legacy_id: int,
                    legacy_home: Path) -> int:  # fmt: skip
        """The host uid of the account ``name`` made at ``created``: the one it was given,
        else a new one, never given before. A home made before accounts had uids of their
        own (owned by ``uid_base`` + ``legacy_id``) keeps its uid for the first account
        that asks for it with no uid recorded yet (the one that upgraded)."""
        assert self.uid_base is not None
        records = self.state_root / "accounts"
        with _locked(records):
            path = records / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"
            found = _read_json(path) or {}
            if found.get("name") == name and found.get("created") == created:
                return int(found["uid"])
            legacy = self.uid_base + legacy_id
            if not found and legacy_id < ACCOUNTS_FROM and _owner(legacy_home) == legacy:
                uid = legacy
            else:
                counter = _read_json(records / "next.json") or {}
                offset = max(int(counter.get("offset", ACCOUNTS_FROM)), ACCOUNTS_FROM)
                if offset >= UID_RANGE:
                    raise HubConflict(f"this Hub has given all {UID_RANGE - ACCOUNTS_FROM} "
                                      "host uids of its range to accounts")  # fmt: skip
                _write_json(records / "next.json", {"offset": offset + 1})
                uid = self.uid_base + offset
            _write_json(path, {"name": name, "created": created, "uid": uid})
            return uid

    def sandbox_name(self, user_id: int, server: str) -> str:
        """The name of a server's cgroups and gVisor container: this Hub's alone."""
        return f"hub-{self.id}-{user_id}-{server}"


def _owner(path: Path) -> int | None:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def _hold(directory: Path, what: str) -> int:
    """An exclusive lock on ``directory`` for this process's life; :class:`HubConflict` if
    another Hub holds it."""
    fd = os.open(directory / ".hub.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HubConflict(f"another Hub is running with {directory} as its {what}: two Hubs on "
                          "one machine need their own (c.LocalSandboxSpawner.homes_root and "
                          "state_root)") from None  # fmt: skip
    return fd


def _read_json(path: Path) -> dict | None:
    """A small JSON file of root's, never through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(4096))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    """``path`` replaced in one rename, mode 0644."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.rename(temporary, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _holders(registry: Path, me: str) -> list[tuple[int, str]]:
    """The ranges other Hubs hold: (base, state root). A range whose Hub's state root is
    gone (or records another range) is free again."""
    held = []
    for entry in registry.iterdir():
        if not entry.name.isdigit():
            continue
        record = _read_json(entry) or {}
        owner, base = record.get("state_root"), int(entry.name)
        if not isinstance(owner, str) or record.get("id") == me:
            continue
        theirs = _read_json(Path(owner) / STATE_FILE) or {}
        if theirs.get("id") == record.get("id") and theirs.get("uid_base") == base:
            held.append((base, owner))
    return held


def claim(state_root: str | Path, homes_root: str | Path, uid_base: int | None,
          registry: Path | None) -> HubInstance:  # fmt: skip
    """This Hub's instance (made on first use, kept in ``state_root``), holding its state
    root and homes' directory, and, with a ``registry`` (root), its range of uids:
    ``uid_base`` if configured, else the one it had, else the lowest free one.
    :class:`HubConflict` if another Hub holds any of them."""
    root = Path(state_root)
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    Path(homes_root).mkdir(mode=0o711, parents=True, exist_ok=True)
    locks = [_hold(root, "state root")]
    try:
        locks.append(_hold(Path(homes_root), "homes' directory"))
        return _claim(root, uid_base, registry, tuple(locks))
    except BaseException:
        for fd in locks:
            os.close(fd)
        raise


def _claim(root: Path, uid_base: int | None, registry: Path | None,
           locks: tuple[int, ...]) -> HubInstance:  # fmt: skip
    mine = _read_json(root / STATE_FILE) or {}
    iid = mine.get("id")
    if not (isinstance(iid, str) and len(iid) == 12 and set(iid) <= _ID_CHARS):
        iid = secrets.token_hex(6)
    if registry is None:
        _write_json(root / STATE_FILE, {"id": iid, "uid_base": None})
        return HubInstance(iid, None, root, locks)
    with _locked(registry):
        held = _holders(registry, iid)
        wanted = uid_base if uid_base is not None else mine.get("uid_base")
        if isinstance(wanted, int):
            if not FIRST_BASE <= wanted <= LAST_BASE:
                raise HubConflict(f"uid_base {wanted} is outside {FIRST_BASE}-{LAST_BASE}")
            for base, owner in held:
                if abs(base - wanted) < UID_RANGE:
                    raise HubConflict(
                        f"host uids {wanted}-{wanted + UID_RANGE - 1} overlap those of the Hub "
                        f"whose state is in {owner} ({base}-{base + UID_RANGE - 1}): two Hubs "
                        "must not share uids. Give this Hub another "
                        "c.LocalSandboxSpawner.uid_base, or none (one is chosen for it)."
                    )  # fmt: skip
        else:
            taken = {base for base, _ in held}
            wanted = next((b for b in range(FIRST_BASE, LAST_BASE + 1, UID_RANGE)
                           if not any(abs(b - t) < UID_RANGE for t in taken)), None)  # fmt: skip
            if wanted is None:
                raise HubConflict("every range of host uids is held by another Hub")
        for stale in registry.iterdir():  # this Hub's earlier range, if it had another
            record = _read_json(stale) or {}
            if stale.name.isdigit() and record.get("id") == iid and int(stale.name) != wanted:
                stale.unlink()
        _write_json(registry / str(wanted), {"id": iid, "state_root": str(root.resolve())})
        _write_json(root / STATE_FILE, {"id": iid, "uid_base": wanted})
    return HubInstance(iid, wanted, root, locks)
