"""A link's ref resolved to a commit (``git ls-remote``), and the repository fetched at it.

The commit names what a launch prepares and caches (one environment per repository
and commit). git runs with no prompt, no credential helper, no config of the user's,
and only the link's transports allowed; it is given a time limit. A full commit
hash is taken as it is (a server cannot be asked about commits it does not
advertise, as BinderHub does not either).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path

from .links import BadLink, RepoLink

_SHA = re.compile(r"^[0-9a-f]{40}$")
#: git, told to touch nothing of this machine's configuration and to ask nobody.
_GIT = ["git", "-c", "credential.helper=", "-c", "protocol.allow=never",
        "-c", "protocol.https.allow=always", "-c", "protocol.http.allow=always",
        "-c", "protocol.git.allow=always"]  # fmt: skip
_QUIET_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
              "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ASKPASS": "/bin/false",
              "SSH_ASKPASS": "/bin/false"}  # fmt: skip


async def resolve(link: RepoLink, timeout: float = 30.0) -> str:
    """The commit ``link.ref`` names in ``link.url``; :class:`BadLink` when the repository
    cannot be reached (``unreachable``) or has no such ref (``unresolvable-ref``)."""
    if _SHA.match(link.ref):
        return link.ref
    out = await git(["ls-remote", "--", link.url], link.url, timeout)
    refs = _advertised(out)
    for name in _candidates(link.ref):
        if name in refs:
            return refs[name]
    raise BadLink("unresolvable-ref", f"{link.url} has no branch, tag or ref {link.ref!r}")


async def fetch(link: RepoLink, commit: str, into: Path, timeout: float = 300.0) -> Path:
    """The repository at ``commit``, checked out in ``into`` (made; it must not exist)."""
    into.parent.mkdir(parents=True, exist_ok=True)
    await git(["clone", "--quiet", "--no-checkout", "--", link.url, str(into)], link.url,
              timeout)  # fmt: skip
    try:
        await git(["-C", str(into), "checkout", "--quiet", "--detach", commit], link.url,
                  timeout)  # fmt: skip
    except BadLink:
        raise BadLink("unresolvable-ref", f"{link.url} has no commit {commit}") from None
    return into


async def git(args: list[str], url: str, timeout: float) -> str:
    """Run git on ``url``'s behalf; its output, or :class:`BadLink` (``unreachable``)."""
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}, **_QUIET_ENV,
           "HOME": "/nonexistent"}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *_GIT, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise BadLink("unreachable", f"{url} did not answer within {timeout:g}s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else f"git exited with {proc.returncode}"
        raise BadLink("unreachable", f"cannot read {url}: {detail}")
    return out.decode(errors="replace")


def _advertised(listing: str) -> dict[str, str]:
    """ref name -> commit; an annotated tag's commit (its ``^{}`` line) wins."""
    refs: dict[str, str] = {}
    for line in listing.splitlines():
        sha, _, name = line.partition("\t")
        if name.endswith("^{}"):
            refs[name[:-3]] = sha
        else:
            refs.setdefault(name, sha)
    return refs


def _candidates(ref: str) -> list[str]:
    if ref == "HEAD" or ref.startswith("refs/"):
        return [ref]
    return [f"refs/heads/{ref}", f"refs/tags/{ref}"]
