"""Errors whose message reaches the person who started the kernel.

jupyter_server answers a failed kernel start with the exception's text only for a
tornado ``HTTPError`` (its ``log_message``); anything else reads "Unhandled error"
in JupyterLab's "Error Starting Kernel" dialog and in the REST answer, and the
reason stays in the server's log. The project's start errors are therefore
HTTPErrors (and RuntimeErrors, as they always were) whose message says what
failed and what to do.
"""

from __future__ import annotations

from tornado import web


class SandboxError(web.HTTPError, RuntimeError):
    """A start error with a message for the user (HTTP 500 with that message)."""

    status = 500

    def __init__(self, message: str = ""):
        # No format arguments: tornado then logs and shows the message as it is.
        super().__init__(self.status, message, reason="Sandboxed kernel failed to start")
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


__all__ = ["SandboxError"]
