"""The Hub's pages in a real browser: log in, watch the spawn progress, land in JupyterLab,
and come back to a hibernated server by visiting it.

Debian's Chromium, driven by Playwright, against the real Hub and proxy.
"""

from __future__ import annotations

from hub_fixtures import Hub, login


async def test_login_spawn_progress_and_resume_by_visiting(hub: Hub, browser):
    page = await browser.new_page()
    await login(page, hub, "olivia")
    # The spawn page streams what the spawner does, then goes to the user's JupyterLab.
    await page.wait_for_url("**/hub/spawn-pending/olivia**", timeout=30_000)
    log = page.locator("#progress-log")
    # (in the folded "event log": present, not necessarily shown)
    await log.get_by_text("sandbox", exact=False).first.wait_for(state="attached", timeout=60_000)
    await page.wait_for_url("**/user/olivia/lab**", timeout=120_000)
    await page.wait_for_selector("#jp-main-dock-panel", timeout=60_000)
    # Hibernated, then visited: the Hub starts the server again on its own.
    await hub.api("DELETE", "/users/olivia/server")
    await hub.wait_stopped("olivia")
    await page.goto(f"{hub.url}/user/olivia/lab")
    await page.wait_for_url("**/user/olivia/lab**", timeout=120_000)
    await page.wait_for_selector("#jp-main-dock-panel", timeout=120_000)
    assert (await hub.api("GET", "/users/olivia"))["servers"][""]["ready"]
