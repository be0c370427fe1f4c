"""config/network.py on its own (no Ferry services): what a URL may be, which addresses are
public, and that a request goes to the checked address, within one deadline."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
import time

import pytest

from config import network
from config.errors import InvalidRequest
from tests.loopback import HTTPServer, Listener


def check(url: str, allow_private: bool = False) -> network.Target:
    return network.target(url, allow_private=allow_private, param="p", what="URL")


@pytest.mark.parametrize("address, inner", [
    ("64:ff9b::7f00:1", "127.0.0.1"),             # NAT64, well-known prefix
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
    ("2002:7f00:1::", "127.0.0.1"),               # 6to4
    ("2002:a00:1::1", "10.0.0.1"),
    ("::7f00:1", "127.0.0.1"),                    # IPv4-compatible
    ("::ffff:0:a00:1", "10.0.0.1"),               # IPv4-translated (SIIT)
    ("::ffff:127.0.0.1", "127.0.0.1"),            # IPv4-mapped
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo (client obfuscated)
])
def test_ipv4_inside_ipv6_is_decoded_and_checked(address, inner):
    ip = ipaddress.IPv6Address(address)
    assert network.embedded_ipv4(ip) == ipaddress.IPv4Address(inner)
    assert not network.is_public(ip)
    with pytest.raises(InvalidRequest, match="private, loopback or link-local") as e:
        check(f"http://[{address}]:8080/x")
    assert e.value.param == "p"


def test_local_nat64_is_refused_and_public_forms_pass():
    assert not network.is_public(ipaddress.ip_address("64:ff9b:1::808:808"))
    for address in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "8.8.8.8"):
        assert network.is_public(ipaddress.ip_address(address)), address
    assert check("http://[64:ff9b::808:808]/x").addresses == ("64:ff9b::808:808",)


@pytest.mark.parametrize("url, reason", [
    # urlsplit sees 8.8.8.8; urllib3 (requests) connects to 127.0.0.1:9999.
    ("http://127.0.0.1:9999\\@8.8.8.8/x", "backslash"),
    ("http://127.0.0.1:9999\t@8.8.8.8/x", "control"),
    ("http://8.8.8.8 @127.0.0.1/x", "space"),
    ("http://8.8.8.8/\x00", "control"),
    ("http://ex\u0430mple.com/", "non-ASCII"),
    ("http://8.8.8.8@127.0.0.1/x", "user name or password"),
    ("http://user:pw@example.com/x", "user name or password"),
    ("http://ex%61mple.com/x", "not a host name"),
    ("http://[fe80::1%25eth0]/x", "ambiguous"),
    ("http://example.com:0/x", "http:// or https://"),
    ("gopher://example.com/x", "http:// or https://"),
])
def test_urls_parsers_may_read_differently_are_refused(url, reason):
    with pytest.raises(InvalidRequest, match=reason):
        check(url, allow_private=True)


def test_request_goes_to_the_checked_address_not_a_fresh_lookup():
    """DNS rebinding: a second lookup could return a private address. ``send`` makes none:
    the name, here one that cannot resolve at all, travels only in the Host header."""
    listener = Listener()
    try:
        t = network.Target("http", "rebinding.invalid", listener.port, "/p?q=1", ("127.0.0.1",),
                           "p", "URL")
        reply = network.send(t, "GET", timeout=5, headers={}, max_bytes=100)
        assert (reply.status, reply.body) == (200, b"ok")
        head = listener.heads[0].decode()
        assert head.startswith("GET /p?q=1 HTTP/1.1\r\n")
        assert f"\r\nHost: rebinding.invalid:{listener.port}\r\n" in head
    finally:
        listener.close()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b"x" * 40,  # slow headers
    b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n" + b"x" * 400,  # slow body
])
def test_one_deadline_bounds_the_whole_exchange(reply):
    listener = Listener(reply=reply, drip=0.05)  # each byte well within any read timeout
    try:
        t = check(listener.url + "/slow", allow_private=True)
        start = time.monotonic()
        with pytest.raises(InvalidRequest, match="took longer than 1 s"):
            network.send(t, "GET", timeout=1, headers={}, max_bytes=10_000)
        assert time.monotonic() - start < 1.5
    finally:
        listener.close()


def test_a_body_cut_short_is_an_error():
    listener = Listener(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    try:
        with pytest.raises(InvalidRequest, match="could not be reached"):
            network.send(check(listener.url, allow_private=True), "GET", timeout=5, headers={},
                         max_bytes=1000)
    finally:
        listener.close()


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """An HTTPS server on 127.0.0.1 whose certificate names ``ferry.test``, signed by a CA
    that the default TLS context trusts for this test (``SSL_CERT_FILE``)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=Ferry test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
            "-subj", "/CN=ferry.test")
    (tmp_path / "ext").write_text("subjectAltName=DNS:ferry.test\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.pem", "-days", "1", "-extfile", "ext")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    # It answers with the Host header it was sent.
    server = HTTPServer(lambda path, headers: (200, {}, headers["Host"].encode()),
                        wrap=lambda sock: context.wrap_socket(sock, server_side=True))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    network._tls.cache_clear()
    yield server.port
    server.close()
    network._tls.cache_clear()


def test_https_to_the_checked_address_verifies_the_urls_host(tls_server):
    def target(host):
        return network.Target("https", host, tls_server, "/", ("127.0.0.1",), "p", "URL")

    reply = network.send(target("ferry.test"), "GET", timeout=5, headers={}, max_bytes=100)
    assert reply.body == f"ferry.test:{tls_server}".encode()
    with pytest.raises(InvalidRequest, match="CERTIFICATE_VERIFY_FAILED"):
        network.send(target("other.test"), "GET", timeout=5, headers={}, max_bytes=100)
