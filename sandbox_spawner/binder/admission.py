"""Launches without login, bounded: a cap on temporary users at once, a rate per client.

With ``--binder-anonymous`` a visitor who is not logged in launches as a temporary user:
a server, a home, CPU and memory, for nobody in particular. So the launcher

* keeps at most ``anonymous_limit`` temporary users at once (running, starting, or being
  made by a launch in flight): the next anonymous launch is refused
  (``too-many-launches``) until one goes (the hibernator deletes them after idle);
* lets one client start at most ``client_launches`` anonymous launches per
  ``client_window`` seconds (:class:`ClientRate`).

A client is its address (:func:`client_of`). The service sits behind the Hub's proxy
(configurable-http-proxy), so every request comes from the proxy's address; the proxy
appends the address it was reached from to ``X-Forwarded-For``. That last entry is
believed only when the request comes from a trusted proxy (``--binder-trusted-proxies``),
and what the client itself sent before it never is. IPv6 clients count per /64 (what one
host is given). Visitors behind one NAT share an address: the cap protects the machine,
the rate the visitors from each other.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Where the Hub's proxy reaches the service on one machine.
LOOPBACK = ("127.0.0.1", "::1")


def networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.0/8``), parsed; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip())


def client_of(peer: str, forwarded: str | None, trusted: tuple[Network, ...]) -> str:
    """Who a request comes from: the connection's address ``peer``; when that is a trusted
    proxy's, the last address of ``forwarded`` (``X-Forwarded-For``) that is not, as far as
    only trusted proxies appended to it. IPv6 as its /64."""
    address = _address(peer)
    if address is None:
        return peer
    hops = [h.strip() for h in (forwarded or "").split(",")]
    while hops and any(address in net for net in trusted):
        hop = _address(hops.pop())
        if hop is None:  # not what a proxy appends: the client wrote it
            break
        address = hop
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientRate:
    """At most ``launches`` per client in any ``window`` seconds (0: no limit)."""

    #: Clients remembered before those with nothing in the window are forgotten.
    PRUNE_AT = 10_000

    def __init__(self, launches: int, window: float):
        self.launches, self.window = launches, window
        self._seen: dict[str, collections.deque[float]] = {}

    def allow(self, client: str, now: float | None = None) -> bool:
        """Whether ``client`` may launch now (a launch allowed is counted)."""
        if not self.launches:
            return True
        now = time.monotonic() if now is None else now
        seen = self._seen.setdefault(client, collections.deque())
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) >= self.launches:
            return False
        seen.append(now)
        if len(self._seen) > self.PRUNE_AT:
            self._seen = {c: s for c, s in self._seen.items() if s and s[-1] > now - self.window}
        return True
