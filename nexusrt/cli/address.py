"""``nexusrt serve``: can HOST:PORT be listened on? Asked before the model loads.

uvicorn finds out only after the model has loaded, prints its own ``ERROR: [Errno 98] ...``
and exits with 3; a bad ``--host`` or a busy port should instead be one line and status 1,
at once. The probe binds the way uvicorn's server will (``loop.create_server``: every address
``getaddrinfo`` gives for the host, ``SO_REUSEADDR`` on POSIX, IPv6 sockets v6-only), then
closes the sockets again. Something may still take the port in between; uvicorn reports that.
"""

from __future__ import annotations

import os
import socket
import sys


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(info) -> bool:
    """Bind (and close) one socket for one ``getaddrinfo`` result, as asyncio's server does;
    False when this kind of socket cannot be made here (asyncio skips it too, e.g. IPv6 off)."""
    family, kind, proto, _, address = info
    try:
        sock = socket.socket(family, kind, proto)
    except OSError:
        return False
    with sock:
        if os.name == "posix" and sys.platform != "cygwin":  # asyncio's default reuse_address
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
        sock.bind(address)
    return True


def check_can_listen(host: str, port: int) -> None:
    """Raise ValueError ``cannot listen on HOST:PORT: <reason>`` unless every address of
    ``host`` (``""``: all interfaces) can be bound at ``port``."""
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
        bound = [_bind(info) for info in infos]
    except (OSError, OverflowError, UnicodeError) as exc:  # gaierror is an OSError
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValueError(f"cannot listen on {_where(host, port)}: {reason}") from None
    if not any(bound):
        raise ValueError(f"cannot listen on {_where(host, port)}: no socket of its address family can be made here")
