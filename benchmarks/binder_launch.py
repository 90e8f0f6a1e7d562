"""Binder launches: a commit's first launch (prepared in a sandbox) and a cached launch,
beside a plain server spawn on the same Hub.

    .venv/bin/python benchmarks/binder_launch.py [--runs 5] [--runtime bubblewrap]

One Hub on this machine (the shipped configuration, LocalSandboxSpawner, Binder links
on), a repository served by git's dumb HTTP protocol and a package index, both on
loopback. Each run, round-robin so that machine noise hits all three alike:

* **plain spawn**: a new user's default server, from the API call to the server
  answering through the proxy (the anchor);
* **first launch**: a new commit of the repository (``binder/requirements.txt``
  naming one package), from the launch request to the server answering through the
  proxy: resolve, fetch, preparation in a sandbox behind the egress allowlist, copy,
  spawn;
* **cached launch**: the same commit, by another new user: nothing to prepare.

Medians and p95 (seconds) and ratios to the plain spawn. Targets: cached launch at
most 1.5x a plain spawn; first launch under 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the harness the tests use

from binder_fixtures import BinderHub, git_repo, launch, server_of, spec  # noqa: E402
from hub_spawn import answers, start_and_time, summary  # noqa: E402


async def timed_launch(setup: BinderHub, user: str, token: str) -> float:
    began = time.perf_counter()
    events = await launch(setup.hub, "git", spec(setup.repo_url), token, urlpath="")
    if events[-1]["phase"] != "ready":
        raise RuntimeError(f"the launch failed: {events[-1]}")
    name, server = server_of(events[-1])
    await answers(setup.hub, f"{name}/{server}", token)
    return time.perf_counter() - began


async def bench(root: Path, runs: int, runtime: str) -> int:
    setup = BinderHub(root, runtime=runtime, args=("--binder-per-repo-limit=0",
                                                   "--binder-per-user-limit=0"))  # fmt: skip
    hub = setup.hub
    times: dict[str, list[float]] = {"plain": [], "first": [], "cached": []}
    try:
        for i in range(runs):
            tokens = {}
            for kind in times:
                name = f"{kind}{i}"
                await hub.api("POST", f"/users/{name}", raise_error=False)
                tokens[kind] = await hub.user_token(name)
            times["plain"].append(await start_and_time(hub, f"plain{i}", tokens["plain"]))
            git_repo(setup.repos, "demo", {"run.txt": f"run {i}\n"},
                     work=setup.repos / "demo-work")  # a new commit: prepared afresh
            times["first"].append(await timed_launch(setup, f"first{i}", tokens["first"]))
            times["cached"].append(await timed_launch(setup, f"cached{i}", tokens["cached"]))
    finally:
        setup.close()
    anchor = statistics.median(times["plain"])
    print(f"Binder launch -> server answers through the proxy, {runs} runs, sandboxes: "
          f"{runtime} (seconds)")
    print(f"{'':34}{'p50':>8}{'p95':>8}{'ratio':>8}")
    for kind, label in (("plain", "plain spawn (new user)"),
                        ("first", "first launch of a commit"),
                        ("cached", "cached launch (another user)")):  # fmt: skip
        p50, p95 = summary(times[kind])
        print(f"{label:34}{p50:8.3f}{p95:8.3f}{p50 / anchor:7.2f}x")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", default="bubblewrap", choices=["bubblewrap", "gvisor"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="binder-bench-") as tmp:
        return asyncio.run(bench(Path(tmp), args.runs, args.runtime))


if __name__ == "__main__":
    sys.exit(main())
