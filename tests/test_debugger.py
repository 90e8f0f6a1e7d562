"""JupyterLab's debugger in a sandboxed kernel: the Debug Adapter Protocol over the control
channel (``debug_request``), as the debugger panel speaks it, down to a breakpoint hit in a
cell. debugpy listens on the sandbox's own loopback; nothing of it reaches the host."""

from __future__ import annotations

import itertools
import socket
from typing import Any

from conftest import Kernel

CELL = "a = 1\nb = a + 1\nprint(b)\n"
_SEQ = itertools.count(1)


async def debug(kernel: Kernel, command: str, **arguments: Any) -> dict[str, Any]:
    """Send one DAP request; its response (which must say success)."""
    kc = kernel.kc
    msg = kc.session.msg("debug_request", {"type": "request", "seq": next(_SEQ),
                                           "command": command, "arguments": arguments})  # fmt: skip
    kc.control_channel.send(msg)
    while True:
        reply = await kc.control_channel.get_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            assert reply["content"].get("success"), (command, reply["content"])
            return reply["content"]


async def stopped_event(kernel: Kernel) -> dict[str, Any]:
    while True:
        msg = await kernel.kc.iopub_channel.get_msg(timeout=30)
        if msg["msg_type"] == "debug_event" and msg["content"].get("event") == "stopped":
            return msg["content"]["body"]


async def test_the_debugger_stops_at_a_breakpoint_in_a_cell(runtime, start_kernel):
    kernel = await start_kernel(runtime)
    info = await kernel.kc.kernel_info(reply=True)
    assert "debugger" in info["content"]["supported_features"]  # Lab shows the debugger
    await debug(kernel, "initialize", clientID="jupyterlab", adapterID="python",
                pathFormat="path", linesStartAt1=True, columnsStartAt1=True)  # fmt: skip
    await debug(kernel, "attach")
    await debug(kernel, "configurationDone")
    port = int(await kernel.value("get_ipython().kernel.debugger.debugpy_client.debugpy_port"))
    with socket.socket() as probe:  # debugpy listens on the sandbox's loopback, not the host's
        assert port > 0 and probe.connect_ex(("127.0.0.1", port)) != 0
    assert (await debug(kernel, "debugInfo"))["body"]["isStarted"]
    source = (await debug(kernel, "dumpCell", code=CELL))["body"]["sourcePath"]
    placed = await debug(kernel, "setBreakpoints", source={"path": source},
                         breakpoints=[{"line": 2}], sourceModified=False)  # fmt: skip
    assert placed["body"]["breakpoints"][0]["verified"]
    msg_id = kernel.kc.execute(CELL)
    stopped = await stopped_event(kernel)
    assert stopped["reason"] == "breakpoint"
    frames = (await debug(kernel, "stackTrace", threadId=stopped["threadId"]))["body"]
    assert frames["stackFrames"][0]["line"] == 2
    scopes = await debug(kernel, "scopes", frameId=frames["stackFrames"][0]["id"])
    ref = scopes["body"]["scopes"][0]["variablesReference"]
    variables = (await debug(kernel, "variables", variablesReference=ref))["body"]["variables"]
    assert {"name": "a", "value": "1"}.items() <= next(
        v for v in variables if v["name"] == "a"
    ).items()  # a is set, b not yet: the cell stopped on line 2
    assert not any(v["name"] == "b" for v in variables)
    await debug(kernel, "continue", threadId=stopped["threadId"])
    assert (await kernel.reply(msg_id))["content"]["status"] == "ok"
    await debug(kernel, "disconnect", restart=False, terminateDebuggee=True)
    assert (await kernel.run("print(b)")).stdout.strip() == "2"
