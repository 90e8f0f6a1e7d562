"""The Hub's REST API, as a service calls it: with its own token, JSON in and out.

The Binder launcher makes users and starts their servers with it, and follows a
spawn's progress (the Hub's server-sent events) to relay it to the launch page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest


def event_stream(on_event: Callable[[dict], Any]) -> Callable[[bytes], None]:
    """A ``streaming_callback`` reading server-sent events: each one's JSON data is handed
    to ``on_event`` (chunks may split or join events)."""
    buffer = b""

    def receive(chunk: bytes) -> None:
        nonlocal buffer
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    on_event(json.loads(line[5:]))

    return receive


class HubAPIError(RuntimeError):
    def __init__(self, code: int, message: str):
        super().__init__(f"the Hub answered {code}: {message}")
        self.code = code


class HubAPI:
    def __init__(self, url: str | None = None, token: str | None = None):
        self.url = (url or os.environ["JUPYTERHUB_API_URL"]).rstrip("/")
        self.token = token or os.environ["JUPYTERHUB_API_TOKEN"]

    def _request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> HTTPRequest:
        return HTTPRequest(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"},
            body=None if body is None and method in ("GET", "DELETE") else json.dumps(body or {}),
            allow_nonstandard_methods=True, request_timeout=kwargs.pop("timeout", 60), **kwargs,
        )  # fmt: skip

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await AsyncHTTPClient().fetch(self._request(method, path, body))
        except HTTPClientError as exc:
            detail = exc.response.body.decode(errors="replace") if exc.response else str(exc)
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("message", detail)
            raise HubAPIError(exc.code, detail) from None
        return json.loads(response.body) if response.body else None

    async def user(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/users/{quote(name, safe='')}")
        except HubAPIError as exc:
            if exc.code == 404:
                return None
            raise

    async def progress(self, user: str, server: str, timeout: float) -> AsyncIterator[dict]:
        """The events of a spawn in progress, until it is ready or has failed."""
        queue: asyncio.Queue[dict | None] = asyncio.Queue()
        receive = event_stream(queue.put_nowait)
        path = f"/users/{quote(user, safe='')}/servers/{quote(server, safe='')}/progress"
        request = self._request("GET", path, streaming_callback=receive, timeout=timeout)
        fetching = asyncio.ensure_future(AsyncHTTPClient().fetch(request, raise_error=False))
        fetching.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
                if event.get("ready") or event.get("failed"):
                    return
        finally:
            fetching.cancel()
