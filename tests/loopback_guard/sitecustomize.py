"""Refuse every connection and name lookup that is not loopback.

tests/s3_server.py puts this directory on the ``PYTHONPATH`` of each process it starts, where
Python imports it at start-up as ``sitecustomize``; the tests' own process calls :func:`install`
(active only while an object-store test runs). A refused attempt raises PermissionError and is
written to stderr, so a test that reached outside this machine fails naming the address.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable


def loopback(host: object, lookup: bool = False) -> bool:
    """Whether ``host`` is this machine: ``localhost`` or a loopback address (for a lookup, also
    an unspecified one: ``0.0.0.0``/``::`` is what a server binds, not a place to go)."""
    if host is None or host in ("localhost", b"localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
    except ValueError:
        return False
    return address.is_loopback or (lookup and address.is_unspecified)


def install(active: Callable[[], bool] = lambda: True) -> None:
    def hook(event: str, args: tuple) -> None:
        if event == "socket.connect" and isinstance(args[1], tuple):
            host, lookup = args[1][0], False
        elif event == "socket.getaddrinfo":
            host, lookup = args[0], True
        else:
            return
        if not loopback(host, lookup) and active():
            message = f"loopback guard: refused {event} to {host!r} (tests may reach 127.0.0.1 only)"
            print(message, file=sys.stderr, flush=True)
            raise PermissionError(message)

    sys.addaudithook(hook)


if __name__ == "sitecustomize":
    install()
