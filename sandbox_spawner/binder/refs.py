"""A link's ref resolved to a commit (``git ls-remote``), and the repository fetched at it.

The commit names what a launch prepares and caches (one environment per repository
and commit). git runs with no prompt, no credential helper, and only the link's
transports allowed; it is given a time limit. A full commit hash is taken as it is (a
server cannot be asked about commits it does not advertise, as BinderHub does not
either).

git goes only where the link says (the deployment's allowlist checked that URL, and
only that URL): it follows no HTTP redirect (``http.followRedirects=false``: by default
git follows one on its first request and goes on from there; the same setting keeps it
from dumb HTTP's ``http-alternates``, another host to take objects from). Nor does any
configuration of the service's machine or process change where it goes (``url.<base>.
insteadOf``, ``http.proxy``, ...): no system or global file, none in the environment
(only ``PATH`` and ``LANG`` are passed on), and no repository of the service's working
directory (git runs in an empty directory of its own, its home too, discovery stopped
there).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from . import child
from .links import BadLink, RepoLink

_SHA = re.compile(r"^[0-9a-f]{40}$")
#: git, told to touch nothing of this machine's configuration, to ask nobody and to go
#: nowhere but the URL it is given.
_GIT = ["git", "-c", "credential.helper=", "-c", "protocol.allow=never",
        "-c", "protocol.https.allow=always", "-c", "protocol.http.allow=always",
        "-c", "protocol.git.allow=always", "-c", "http.followRedirects=false"]  # fmt: skip
_QUIET_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
              "GIT_CONFIG_SYSTEM": "/dev/null", "GIT_CONFIG_GLOBAL": "/dev/null",
              "GIT_ASKPASS": "/bin/false", "SSH_ASKPASS": "/bin/false"}  # fmt: skip
#: What git says of an answer it did not follow: a redirect.
_REDIRECT = re.compile(r"returned error: (30[12378])\b")


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
    into = Path(os.path.abspath(into))  # (git runs in a directory of its own)
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
    """Run git on ``url``'s behalf (paths in ``args`` absolute); its output, or
    :class:`BadLink` (``unreachable``)."""
    with tempfile.TemporaryDirectory(prefix="jupyter-sandbox-git-") as empty:
        # Its working directory and home: empty, and no repository is looked for above.
        env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}, **_QUIET_ENV,
               "HOME": empty, "GIT_CEILING_DIRECTORIES": os.path.dirname(empty)}  # fmt: skip
        try:
            code, out, err = await child.run([*_GIT, *args], env=env, cwd=empty,
                                             timeout=timeout)  # fmt: skip
        except TimeoutError:  # (and a launch that went away: git ends too)
            raise BadLink("unreachable", f"{url} did not answer within {timeout:g}s") from None
    if code != 0:
        detail = child.last_line(err, code)
        if redirect := _REDIRECT.search(detail):
            detail = (f"it answers with a redirect (HTTP {redirect.group(1)}), which is not "
                      "followed: link the repository's own URL")  # fmt: skip
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
