"""BinderHub's link forms, read into what to fetch and where to go after the launch.

``/v2/<provider>/<spec>`` with providers ``gh`` (``<org>/<repo>/<ref>``), ``gl``
(``<escaped namespace>/<ref>``), ``gist`` (``<user>/<id>[/<ref>]``) and ``git``
(``<escaped URL>/<ref>``), as mybinder.org reads them; ``HEAD`` is the default
branch. After the launch the browser goes to ``urlpath`` in the user's server
(legacy ``labpath`` = ``doc/tree/<path>``, ``filepath`` = ``tree/<path>``).

A link is untrusted input: only ``https``, ``http`` and ``git`` URLs are fetched
(never ``file:``, ``ssh``, or git's ``ext::`` transport, which runs a command), only
from hosts the deployment allows, and ``urlpath`` stays inside the user's server
(no scheme, no ``//host``: the launch page is no open redirect).
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

#: Where the hosted providers' repositories are (a deployment may point them elsewhere).
DEFAULT_BASES = {
    "gh": "https://github.com",
    "gl": "https://gitlab.com",
    "gist": "https://gist.github.com",
}
SCHEMES = ("https", "http", "git")
_NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]+$")  # a path part, never "." or ".."


class BadLink(ValueError):
    """A link that cannot be launched; ``reason`` names why (for the ``failed`` event)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RepoLink:
    provider: str
    #: The clone URL.
    url: str
    #: The ref as the link gave it (a branch, a tag, a commit, or ``HEAD``).
    ref: str
    #: The spec as it was in the link (for messages and badges).
    spec: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def web_url(self) -> str | None:
        """The repository's page (its https or http URL without ``.git``, made of its
        checked parts); None for git://."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            return None
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        return f"{parts.scheme}://{host}{quote(parts.path, safe='/')}".removesuffix(".git")

    @property
    def ref_url(self) -> str | None:
        """The page of the ref, where the provider's layout is known (GitHub, GitLab)."""
        web = self.web_url
        if web is None or self.ref == "HEAD":
            return None
        if self.provider == "gh":
            return f"{web}/tree/{quote(self.ref, safe='')}"
        if self.provider == "gl":
            return f"{web}/-/tree/{quote(self.ref, safe='')}"
        return None

    @property
    def name(self) -> str:
        """A short name for the repository (its last path part, without ``.git``)."""
        return posixpath.basename(urlsplit(self.url).path.rstrip("/")).removesuffix(".git")


@dataclass
class LinkPolicy:
    """What a deployment lets links fetch: host patterns (``fnmatch``; ``*`` for any)
    and the providers' base URLs."""

    allowed_hosts: list[str] = field(default_factory=lambda: ["github.com", "gitlab.com",
                                                              "gist.github.com"])  # fmt: skip
    bases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_BASES))

    def parse(self, provider: str, spec: str) -> RepoLink:
        """The repository and ref a ``/v2/<provider>/<spec>`` link names, or :class:`BadLink`."""
        reader = _READERS.get(provider)
        if reader is None:
            known = ", ".join(sorted(_READERS))
            raise BadLink("unknown-provider", f"unknown provider {provider!r}; use one of {known}")
        url, ref = reader(self, spec)
        # git's own rules for names (check-ref-format), and no part a URL would read as
        # a path's: "..", a component starting with ".", "#", a control character.
        if (not ref or ref.startswith("-") or ".." in ref or "#" in ref
                or any(c in ref for c in " \t~^:?*[\\") or not ref.isprintable()
                or any(part.startswith(".") for part in ref.split("/"))):  # fmt: skip
            raise BadLink("malformed", f"{ref!r} is not a ref (in {provider}/{spec})")
        link = RepoLink(provider, url, ref, spec)
        self.check_url(link.url)
        return link

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise BadLink("disallowed-host", f"{url!r} is not an https, http or git URL")
        # One reading of the host for git, Python and browsers alike: no credentials, no
        # backslash (a browser reads it as "/", so "h\\@allowed" is host h there), no
        # space or control character.
        if ("@" in parts.netloc or "\\" in url or not url.isprintable()
                or any(c.isspace() for c in url)):  # fmt: skip
            raise BadLink("disallowed-host", f"{url[:200]!r}: a repository's URL may not "
                          "hold credentials, backslashes, spaces or control characters")
        if not any(fnmatch.fnmatch(parts.hostname, pattern) for pattern in self.allowed_hosts):
            raise BadLink("disallowed-host", f"repositories from {parts.hostname} are not "
                          "allowed here: an administrator can add the host to the "
                          "deployment's allowed hosts (JUPYTER_SANDBOX_BINDER_HOSTS in the "
                          "shipped configuration; the service's "
                          "--binder-allowed-hosts)")  # fmt: skip


def launch_path(urlpath: str = "", labpath: str = "", filepath: str = "") -> str:
    """Where in the user's server the browser goes: a path (no leading slash) inside it."""
    if labpath:
        path = f"doc/tree/{labpath.lstrip('/')}"
    elif filepath:
        path = f"tree/{filepath.lstrip('/')}"
    else:
        path = urlpath
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or path.startswith(("//", "\\")) or "\\" in path:
        raise BadLink("malformed", f"urlpath {path!r} must be a path inside the server")
    clean = posixpath.normpath("/" + parts.path).lstrip("/")
    if clean == ".":
        clean = ""
    return clean + (f"?{parts.query}" if parts.query else "")


def _split_ref(spec: str, provider: str) -> tuple[str, str]:
    if "/" not in spec:
        raise BadLink("malformed", f"{provider}/{spec}: expected <repository>/<ref>")
    head, ref = spec.rsplit("/", 1)
    return head, unquote(ref)


def _github(policy: LinkPolicy, spec: str) -> tuple[str, str]:
    parts = spec.split("/", 2)
    if len(parts) != 3 or not all(_NAME.match(p) for p in parts[:2]):
        raise BadLink("malformed", f"gh/{spec}: expected gh/<org>/<repo>/<ref>")
    org, repo, ref = parts
    return f"{policy.bases['gh']}/{org}/{repo.removesuffix('.git')}", unquote(ref)


def _gitlab(policy: LinkPolicy, spec: str) -> tuple[str, str]:
    namespace, ref = _split_ref(spec, "gl")
    path = unquote(namespace).strip("/")
    if not path or not all(_NAME.match(p) for p in path.split("/")) or len(path.split("/")) < 2:
        raise BadLink("malformed", f"gl/{spec}: expected gl/<escaped group/project>/<ref>")
    return f"{policy.bases['gl']}/{path.removesuffix('.git')}", ref


def _gist(policy: LinkPolicy, spec: str) -> tuple[str, str]:
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(_NAME.match(p) for p in parts[:2]):
        raise BadLink("malformed", f"gist/{spec}: expected gist/<user>/<id>[/<ref>]")
    ref = unquote(parts[2]) if len(parts) == 3 else "HEAD"
    return f"{policy.bases['gist']}/{parts[0]}/{parts[1]}.git", ref


def _git(policy: LinkPolicy, spec: str) -> tuple[str, str]:
    escaped, ref = _split_ref(spec, "git")
    return unquote(escaped), ref


_READERS = {"gh": _github, "gl": _gitlab, "gist": _gist, "git": _git}
