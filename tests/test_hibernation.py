"""Hibernation: idle servers stop (homes kept), busy kernels keep theirs, and they resume.

The shipped configuration's hibernator service, with a 4 second timeout, on a
real Hub and proxy.
"""

from __future__ import annotations

import asyncio

from hub_fixtures import Hub, supervisors


async def test_an_idle_server_hibernates_and_resumes_with_its_files(hibernating_hub: Hub):
    hub = hibernating_hub
    await hub.spawn("ivan")
    ivan = await hub.user_token("ivan")
    await hub.execute("ivan", ivan, "open('notes.txt', 'w').write('before the nap')")
    supervisor = (await hub.state("ivan"))["supervisor_pid"]
    assert await hub.stops_within("ivan", 60), "an idle server hibernates"
    assert supervisor not in supervisors(hub.root)  # no process of ivan's is left
    assert (hub.root / "homes" / "ivan" / "notes.txt").read_text() == "before the nap"
    # A Hub restart leaves a hibernated server hibernated.
    hub.stop()
    hub.start()
    await asyncio.sleep(2)
    assert not (await hub.api("GET", "/users/ivan")).get("servers")
    # Resumed (as the next visit does): the files are there, the token still works.
    await hub.api("POST", "/users/ivan/server")
    await hub.wait_ready("ivan")
    assert await hub.execute("ivan", ivan, "print(open('notes.txt').read())") == "before the nap\n"


async def test_a_busy_kernel_without_a_browser_keeps_its_server(hibernating_hub: Hub):
    hub = hibernating_hub
    await hub.spawn("judy")
    judy = await hub.user_token("judy")
    await hub.run_detached("judy", judy, "import time; time.sleep(14)")
    assert not await hub.stops_within("judy", 10), "a busy kernel keeps its server"
    # Once the computation is over and the server quiet, it hibernates.
    assert await hub.stops_within("judy", 60)
