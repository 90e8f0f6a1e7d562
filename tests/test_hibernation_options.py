"""The hibernator's options on a real Hub (the shipped local configuration): ``--dry-run``
only logs what it would hibernate; ``--max-age`` hibernates a server in use once it is
old enough, though the idle timeout is an hour."""

from __future__ import annotations

import asyncio


async def test_dry_run_logs_and_stops_nothing(make_hub):
    hub = make_hub(2, "--dry-run", "--interval=1")
    await hub.spawn("kay")
    for _ in range(60):
        if "would hibernate kay (dry run)" in hub.log.read_text():
            break
        await asyncio.sleep(0.5)
    assert "would hibernate kay (dry run)" in hub.log.read_text()
    assert not await hub.stops_within("kay", 4)


async def test_max_age_hibernates_a_server_in_use(make_hub):
    hub = make_hub(3600, "--max-age=6", "--interval=1")
    await hub.spawn("lou")
    token = await hub.user_token("lou")
    assert (await hub.execute("lou", token, "print('in use')")).strip() == "in use"
    assert await hub.stops_within("lou", 40), "hibernated at its max age"
    assert "running for" in hub.log.read_text()  # the reason logged: its age, not idleness


async def test_max_age_stops_a_server_that_will_not_answer(make_hub):
    """A server made to answer nothing (its socket taken over by the user's code) cannot
    say whether a kernel is busy: left alone while young, stopped at its max age."""
    hub = make_hub(3600, "--max-age=20", "--interval=1")
    await hub.spawn("mute")
    token = await hub.user_token("mute")
    # The socket is taken over once the kernel that starts this is gone (its parent
    # changes): the test's own request that ends the kernel must still get through.
    silence = (
        "import os, socket, time\nRUN = '/run/jupyter-sandbox'\n"
        "parent = os.getppid()\n"
        "while os.getppid() == parent:\n    time.sleep(0.05)\n"
        "os.rename(RUN + '/server.sock', RUN + '/server.real')\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(RUN + '/server.sock'); s.listen(16)\n"
        "while True:\n    s.accept()[0].close()\n"
    )
    await hub.execute("mute", token, "import subprocess, sys\n"
                      f"subprocess.Popen([sys.executable, '-c', {silence!r}], "
                      "start_new_session=True)\n")  # fmt: skip
    assert await hub.stops_within("mute", 60), "stopped at its max age"
    assert "does not say whether a kernel is busy" in hub.log.read_text()
