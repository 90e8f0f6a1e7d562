"""Binder-style links: a URL names a repository at a ref; it opens, running, in a sandbox.

This package holds the parts that do not depend on a Hub: :mod:`.links` reads
BinderHub's link forms into a :class:`~.links.RepoLink` (and refuses what must not
be fetched), :mod:`.refs` resolves a ref to a commit and fetches the repository at
it, :mod:`.environment` reads what environment the repository asks for (and names
what is not prepared).
"""
