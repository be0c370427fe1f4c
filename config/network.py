"""Outbound address policy, shared by every place Ferry connects to a URL a client gave it
(image URLs, webhooks): only public addresses, unless the operator allows private ones.

The check resolves the host now and returns the addresses it approved, so a caller can
connect to exactly those (closing the gap in which DNS could be changed to a private one).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from config.errors import InvalidRequest


def public_addresses(url: str, *, allow_private: bool, param: str, what: str) -> tuple[str, int, list[str]]:
    """(host, port, approved IP addresses) for an http(s) URL, or ``InvalidRequest``."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise InvalidRequest(f"The {what} must be an http:// or https:// URL.", param=param)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidRequest(f"The {what}'s host '{parts.hostname}' does not resolve.",
                             param=param) from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not allow_private and (not ip.is_global or ip.is_multicast):
            raise InvalidRequest(
                f"The {what}'s host resolves to {ip}, a private, loopback or link-local "
                f"address; only public addresses are allowed.", param=param)
        addresses.append(str(ip))
    return parts.hostname, port, addresses
