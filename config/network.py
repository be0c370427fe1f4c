"""Outbound requests to URLs that clients hand Ferry (image URLs, webhooks): only to public
addresses unless the operator allows private ones, and only to the address that was checked.

Each rule closes a way in (issue #12):

- A URL is parsed once, here, and refused unless every parser reads it alike: no
  backslash, user name or password, space, control or non-ASCII character; a host of
  letters, digits, dots, hyphens and underscores or a bracketed IPv6 literal; and urllib3's
  ``parse_url`` (what ``requests`` uses) must find the same scheme, host and port as
  ``urlsplit``. (``http://127.0.0.1:9999\\@8.8.8.8/`` is 8.8.8.8 to ``urlsplit`` and
  127.0.0.1:9999 to ``requests``.)
- Every address the host resolves to must be public, and so must the IPv4 address inside
  an IPv6 one (mapped, compatible, translated, 6to4, NAT64, Teredo): a gateway or the
  host's own stack may deliver those to the private IPv4 address they carry.
- ``send()`` connects to an approved address and never looks the name up again (DNS
  rebinding); the name goes only into the Host header and TLS (SNI, certificate check). It
  follows no redirects, and one deadline bounds the whole exchange: connect, TLS, request,
  headers and body, so a server that drips a byte at a time cannot hold a worker.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from urllib3.util import parse_url

from config.errors import HostNotFound, InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOSTNAME = re.compile(r"[a-z0-9_.-]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# IPv6 forms that carry an IPv4 address in their last 32 bits: NAT64's well-known prefix
# (RFC 6052), IPv4-compatible (deprecated, RFC 4291) and IPv4-translated (RFC 2765).
_LAST_32_BITS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
# NAT64 for local use (RFC 8215): not globally reachable, whatever Python's table says.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``addresses``, in order) and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]
    # For error messages: the request field the URL came from, and what it is.
    param: str
    what: str

    @property
    def authority(self) -> str:
        """The Host header: the URL's host (bracketed if IPv6), and its port if not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def error(self, message: str) -> InvalidRequest:
        return InvalidRequest(message, param=self.param)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


def target(url: str, *, allow_private: bool, param: str, what: str) -> Target:
    """Parse ``url``, resolve its host and check every address, or raise ``InvalidRequest``."""
    scheme, host, port, path = _parse(url, param, what)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise HostNotFound(f"The {what}'s host '{host}' does not resolve.", param=param) from None
    addresses: list[str] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not allow_private and not is_public(ip):
            inner = embedded_ipv4(ip) if ip.version == 6 else None
            shown = f"{ip} (IPv4 {inner} inside)" if inner is not None else str(ip)
            raise InvalidRequest(
                f"The {what}'s host resolves to {shown}, a private, loopback or link-local "
                f"address; only public addresses are allowed.", param=param)
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return Target(scheme, host, port, path, tuple(addresses), param, what)


def _parse(url: str, param: str, what: str) -> tuple[str, str, int, str]:
    if any(c <= " " or c == "\x7f" or c == "\\" or not c.isascii() for c in url):
        raise InvalidRequest(f"The {what} contains a backslash, a space, a control or a "
                             "non-ASCII character; percent-encode it.", param=param)
    malformed = InvalidRequest(f"The {what} must be an http:// or https:// URL.", param=param)
    try:
        parts = urlsplit(url)
        port = parts.port
        theirs = parse_url(url)
    except ValueError:  # urllib3's LocationParseError is one too
        raise malformed from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise malformed
    if "@" in parts.netloc:
        raise InvalidRequest(f"The {what} must not carry a user name or password.", param=param)
    host = parts.hostname
    if not (_HOSTNAME.fullmatch(host) or _is_ipv6_literal(host)):
        raise InvalidRequest(f"The {what}'s host '{host}' is not a host name or an IP address.",
                             param=param)
    port = _DEFAULT_PORTS[parts.scheme] if port is None else port
    their_port = _DEFAULT_PORTS[parts.scheme] if theirs.port is None else theirs.port
    if (theirs.scheme, (theirs.host or "").strip("[]"), their_port) != (parts.scheme, host, port):
        raise InvalidRequest(f"The {what} is ambiguous: URL parsers disagree on where it points.",
                             param=param)
    if port == 0:
        raise malformed
    return parts.scheme, host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _is_ipv6_literal(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, in the forms that are turned back into IPv4
    on the way (by the host's stack, a 6to4 relay, a NAT64 gateway or a Teredo relay)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _LAST_32_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """Globally reachable unicast, and so is any IPv4 address it carries."""
    if not ip.is_global or ip.is_multicast:
        return False
    if ip.version == 4:
        return True
    if ip in _LOCAL_NAT64:
        return False
    inner = embedded_ipv4(ip)
    return inner is None or is_public(inner)


def send(target: Target, method: str, *, timeout: float, headers: dict[str, str],
         body: bytes | None = None, max_bytes: int | None = None) -> Reply:
    """One request to ``target``, all of it within ``timeout`` seconds.

    Connects to the first approved address that accepts. Reads the body of a 2xx reply when
    ``max_bytes`` is given (refusing more than that), and no other body. Every failure is an
    ``InvalidRequest`` with the target's ``param``.
    """
    deadline = _Deadline(timeout)
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.sock = _connect(target, deadline)
        conn.request(method, target.path, body=body,
                     headers={"Host": target.authority, "Accept-Encoding": "identity", **headers})
        resp = conn.getresponse()
        data = b""
        if max_bytes is not None and 200 <= resp.status < 300:
            data = _read(resp, max_bytes, target)
        if deadline.passed():  # the cut can look like the end of a body
            raise TimeoutError
        return Reply(resp.status, data)
    except (OSError, http.client.HTTPException) as e:
        if deadline.passed():
            raise target.error(f"The {target.what} took longer than {timeout:g} s to answer.") from None
        raise target.error(f"The {target.what} could not be reached: {e}") from None
    finally:
        deadline.cancel()
        conn.close()


def _connect(target: Target, deadline: _Deadline) -> socket.socket:
    error: OSError | None = None
    for address in target.addresses:
        try:
            sock = socket.create_connection((address, target.port), timeout=deadline.left())
        except OSError as e:
            error = e
            continue
        deadline.watch(sock)
        if target.scheme == "https":
            # The certificate must name the URL's host, though the address was chosen here.
            try:
                sock = _tls().wrap_socket(sock, server_hostname=target.host)
            except OSError:
                deadline.cancel()  # before the descriptor is freed
                sock.close()
                raise
        return sock
    raise error or OSError("no address to connect to")


@cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


def _read(resp: http.client.HTTPResponse, limit: int, target: Target) -> bytes:
    too_large = target.error(f"The {target.what}'s response is larger than {limit} bytes.")
    if int(resp.getheader("Content-Length") or 0) > limit:
        raise too_large
    data = bytearray()
    while chunk := resp.read(65536):
        data += chunk
        if len(data) > limit:
            raise too_large
    if resp.length:  # http.client reads a body cut short without complaint
        raise http.client.IncompleteRead(bytes(data), resp.length)
    return bytes(data)


class _Deadline:
    """Shuts the connection down when time is up, under whatever call is blocked on it.

    A socket timeout bounds each read, not their sum: a server sending a byte a second never
    trips it. The shutdown goes through a duplicate descriptor, so neither the TLS object nor
    gevent's socket wrapper is touched from another thread (shutdown acts on the connection,
    whichever descriptor names it), and never after ``cancel()``: the descriptor number may
    by then belong to another connection.
    """

    def __init__(self, seconds: float):
        self._at = time.monotonic() + seconds
        self._lock = threading.Lock()
        # The connection's descriptor: TLS takes the socket object over, not the number.
        self._fd: tuple[int, int, int] | None = None
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def passed(self) -> bool:
        return time.monotonic() >= self._at

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._fd = (sock.fileno(), sock.family, sock.type)
        if self.passed():
            self._cut()

    def cancel(self) -> None:
        with self._lock:
            self._fd = None
        self._timer.cancel()

    def _cut(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                with socket.fromfd(*self._fd) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer closed it already
