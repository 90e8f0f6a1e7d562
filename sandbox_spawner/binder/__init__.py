"""Binder-style links: a URL names a repository at a ref; it opens, running, in a sandbox.

* :mod:`.links` reads BinderHub's link forms into a :class:`~.links.RepoLink` (and
  refuses what must not be fetched); :mod:`.refs` resolves a ref to a commit and
  fetches the repository at it; :mod:`.environment` reads what environment the
  repository asks for (and names what is not prepared);
* :mod:`.prepare` prepares it once per commit in a sandbox (:mod:`.inside` runs there)
  whose only way out is the egress allowlist proxy (:mod:`.egress`); on Kubernetes in a
  pod (:mod:`.kube_prepare`); :mod:`.seal` takes in what the sandbox left (measured,
  read as input, readable by all); :mod:`.cache` bounds what is kept;
* :mod:`.launch` takes a link to a running server (BinderHub's event stream), through
  the Hub API, within :mod:`.admission`'s limits for launches without login;
  :mod:`.server` is what a spawner adds to a launched repository's server (the user's
  copy made by :mod:`.home_copy`, as the user; :mod:`.begin` in its pod on Kubernetes);
  :mod:`.web` serves the launch page, the event stream and a form for links and badges
  on the Hub service.

Whatever a sandbox, a repository or a user wrote is handled by root only through
:mod:`.untrusted`: beneath descriptors, never through a link, within bounds.
"""
