"""Hub users' servers under gVisor, restored from one template that serves every user.

The first start is cold and builds the template in the background; later starts
of any user restore it, and each restored server becomes its own user (uid,
home, token) before it runs anything.
"""

from __future__ import annotations

import asyncio
import json
import time

from hub_fixtures import Hub


async def template_ready(hub: Hub, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = hub.log.read_text()
        if "gVisor template" in log and "is ready" in log:
            return
        assert "gVisor template" not in log or "failed" not in log, log[-3000:]
        await asyncio.sleep(0.5)
    raise TimeoutError("no server template was built")


async def test_servers_restored_from_one_template_are_each_their_users(gvisor_hub: Hub):
    hub = gvisor_hub
    await hub.spawn("kim")
    await template_ready(hub)
    await hub.api("DELETE", "/users/kim/server")
    await hub.wait_stopped("kim")
    for name in ("kim", "lee"):
        started = time.monotonic()
        await hub.spawn(name)
        assert "(restored from a template)" in hub.log.read_text().split(f"{name}: Starting")[-1]
        token = await hub.user_token(name)
        probe = (
            "import os, json; open('mine.txt', 'w').write('x')\n"
            "print(json.dumps([os.getuid(), os.getcwd(), os.environ['JUPYTERHUB_USER']]))"
        )
        uid, cwd, user = json.loads(await hub.execute(name, token, probe))
        home = hub.root / "homes" / name
        assert (uid, cwd, user) == (home.stat().st_uid, "/home/jovyan", name)
        assert (home / "mine.txt").stat().st_uid == uid != 0
        print(f"{name}: restored and answering in {time.monotonic() - started:.2f}s")
    assert (hub.root / "homes" / "kim").stat().st_uid != (hub.root / "homes" / "lee").stat().st_uid
