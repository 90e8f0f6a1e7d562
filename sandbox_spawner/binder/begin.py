"""A launched repository's server on Kubernetes, before it starts: the user's copy of the
repository in the server's home, then the repository's ``start`` script or the server.

    python -m sandbox_spawner.binder.begin --from /srv/binder-repo --home /home/jovyan \\
        [--start binder/start] -- jupyterhub-singleuser ...

The server's home (``--home``, the named server's own volume) gets the prepared commit's
files on the server's first start; later starts find the user's copy, with their
changes, and copy nothing (a file the user deleted stays deleted). Then it becomes the
repository's ``start`` script with the server's command as its arguments (``exec
"$@"``), or the server itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .inside import ENV_PATH

#: In the home: the copy has been made (it holds the commit it was made from).
MARKER = ".jupyter-sandbox-binder"


def copy_once(source: Path, home: Path) -> bool:
    """Copy ``source``'s files into ``home`` unless done before; never over a file there."""
    marker = home / MARKER
    if marker.exists():
        return False
    for path in sorted(source.rglob("*")):
        target = home / path.relative_to(source)
        if path.is_symlink():
            if not target.exists() and not target.is_symlink():
                target.symlink_to(os.readlink(path))
        elif path.is_dir():
            target.mkdir(exist_ok=True)
        elif not target.exists():
            shutil.copy2(path, target)
            target.chmod(target.stat().st_mode | 0o200)  # the user's to change
    marker.write_text(str(source) + "\n")
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: python -m sandbox_spawner.binder.begin --from DIR [--start PATH] "
                 "-- COMMAND...")  # fmt: skip
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m sandbox_spawner.binder.begin")
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--start", default="")
    parser.add_argument("--home", default=os.environ.get("HOME", "/home/jovyan"))
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    home = Path(args.home)
    copy_once(Path(args.source), home)
    # The prepared environment's programs first (its packages are on PYTHONPATH already).
    os.environ["PATH"] = f"{ENV_PATH}/bin:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
    os.chdir(home)
    if args.start:
        command = [str(home / args.start), *command]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
