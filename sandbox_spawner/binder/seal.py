"""What a preparation leaves, taken in by root: measured, read as input, sealed.

The preparation's sandbox (or pod) writes the repository's checkout and the environment as
an unprivileged uid; the service (root) then measures them and reads the environment's
``.site`` before they become a prepared commit. All of it by descriptor
(:mod:`.untrusted`): the writer may have left links, pipes, directories nested to no end.

* :func:`over_limits`: what it takes on disk, against the preparation's limit; while it
  runs and once it has ended;
* :func:`read_site`: ``.site`` is a short relative path of the environment, else refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import untrusted

#: Bytes ``.site`` may have (a path of the environment's, relative).
SITE_LIMIT = 4096
_SITE = re.compile(r"[^\x00-\x1f\x7f-\x9f:]+")
#: What the preparation wrote, of its directory.
KEPT = ("repo", "env")


class Unusable(ValueError):
    """What the preparation left cannot be used; the message says why."""


def over_limits(work: Path, max_bytes: int, *, strict: bool) -> str | None:
    """What the preparation in ``work`` has gone past (its repository and environment
    together), None when it is within ``max_bytes`` (0: no limit). ``strict``: the tree is
    at rest (else a running sandbox's: what vanishes meanwhile is skipped)."""
    used = 0
    for sub in KEPT:
        try:
            fd = untrusted.open_dir(work / sub)
            try:  # (+ 1: what is left of a bound may be 0, which is no bound to usage())
                used += untrusted.usage(fd, max_bytes=max_bytes and max_bytes - used + 1,
                                        strict=strict)  # fmt: skip
            finally:
                os.close(fd)
        except untrusted.Refused as exc:
            return str(exc)
        if max_bytes and used > max_bytes:
            return f"more than {max_bytes >> 20} MiB of disk"
    return None


def disk_usage(root: Path) -> int:
    """Bytes the files below ``root`` (a prepared commit, at rest) take on disk."""
    fd = untrusted.open_dir(root)
    try:
        return untrusted.usage(fd, strict=False)
    finally:
        os.close(fd)


def valid_site(text: object) -> bool:
    """Whether ``text`` can be where an environment's packages are: a relative path inside
    it (no ``..``), with no ``:`` (it goes into ``PYTHONPATH``) and no control character."""
    return (isinstance(text, str) and bool(_SITE.fullmatch(text)) and not text.startswith("/")
            and ".." not in text.split("/"))  # fmt: skip


def read_site(env: Path, name: str, default: str) -> str:
    """The environment's ``name`` (``.site``, written in the sandbox), checked;
    ``default`` when there is none. :class:`Unusable` for a link, a special or large file,
    or content that is no relative path of the environment."""
    fd = untrusted.open_dir(env)
    try:
        raw = untrusted.read_file(fd, name, SITE_LIMIT)
    except FileNotFoundError:
        return default
    except untrusted.Refused as exc:
        raise Unusable(f"the environment's {name} is refused: {exc}") from None
    finally:
        os.close(fd)
    text = raw.decode("utf-8", "replace").strip()
    if not valid_site(text):
        raise Unusable(f"the environment's {name} names no directory of it ({text[:80]!r}): "
                       "refused")  # fmt: skip
    return text
