"""The hibernator's options on a real Hub (the shipped local configuration): ``--dry-run``
only logs what it would hibernate; ``--max-age`` hibernates a server in use once it is
old enough, though the idle timeout is an hour."""

from __future__ import annotations

import asyncio

import pytest
from hub_fixtures import Hub, end_supervisors


def with_service_args(*args: str) -> str:
    """Hub configuration that adds ``args`` to the sandbox-service's command."""
    return "\n".join(f"c.JupyterHub.services[0]['command'].append({a!r})" for a in args) + "\n"


@pytest.fixture
def make_hub(tmp_path_factory):
    from conftest import require_runtime

    require_runtime("bubblewrap")
    hubs: list[Hub] = []

    def make(hibernate_after: float, *args: str) -> Hub:
        root = tmp_path_factory.mktemp("hub-options")
        hub = Hub(root, hibernate_after=hibernate_after, extra_config=with_service_args(*args))
        hubs.append(hub.start())
        return hub

    yield make
    for hub in hubs:
        hub.close()
        end_supervisors(hub.root)


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
