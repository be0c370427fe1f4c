"""Image inputs: data URLs decoded; URL fetching off by default, public-only when on, capped."""

from __future__ import annotations

import base64
import time

import openai
import pytest

from config import load_settings
from config.errors import InvalidRequest
from tests.loopback import HTTPServer, Listener
from tasks.core.images import load_image

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def image_server():
    def answer(path, headers):
        if path == "/redirect":
            return 302, {"Location": "http://169.254.169.254/"}, b""
        return 200, {}, PNG if path == "/a.png" else b"x" * 4096

    server = HTTPServer(answer)
    yield server.url
    server.close()


def test_data_url_decoded_and_checked():
    s = load_settings()
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert load_image(url, s, "p") == PNG
    with pytest.raises(InvalidRequest, match="base64"):
        load_image("data:image/png;base64,@@@", s, "p")
    with pytest.raises(InvalidRequest):
        load_image("data:text/plain,hello", s, "p")
    with pytest.raises(InvalidRequest, match="larger"):
        load_image(url, load_settings(max_image_bytes=10), "p")


def test_fetching_is_off_by_default(image_server):
    with pytest.raises(InvalidRequest, match="disabled") as e:
        load_image(image_server + "/a.png", load_settings(), "messages[0].content[1]")
    assert e.value.param == "messages[0].content[1]"


def test_private_addresses_refused(image_server):
    on = load_settings(fetch_image_urls=True)
    for url in (image_server + "/a.png", "http://localhost/a.png", "http://10.0.0.1/a.png",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/a.png"):
        with pytest.raises(InvalidRequest, match="private, loopback or link-local"):
            load_image(url, on, "p")
    with pytest.raises(InvalidRequest, match="http"):
        load_image("file:///etc/passwd", on, "p")


def test_fetch_when_allowed_with_limits(image_server):
    s = load_settings(fetch_image_urls=True, fetch_allow_private=True)
    assert load_image(image_server + "/a.png", s, "p") == PNG
    with pytest.raises(InvalidRequest, match="larger"):
        load_image(image_server + "/big", load_settings(fetch_image_urls=True,
                   fetch_allow_private=True, max_image_bytes=1000), "p")
    with pytest.raises(InvalidRequest, match="HTTP 302"):
        load_image(image_server + "/redirect", s, "p")


def test_ipv6_literal_image_url_fetched_or_refused_with_param():
    server = Listener("::1", reply=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PNG) + PNG)
    try:
        url = server.url + "/a.png"
        allowed = load_settings(fetch_image_urls=True, fetch_allow_private=True)
        assert load_image(url, allowed, "p") == PNG
        assert f"Host: [::1]:{server.port}" in server.heads[0].decode()
        with pytest.raises(InvalidRequest, match="private") as e:
            load_image(url, load_settings(fetch_image_urls=True), "messages[0].content[1]")
        assert e.value.param == "messages[0].content[1]"
        assert server.connections == 1
    finally:
        server.close()


def test_address_tricks_refused_before_any_connection():
    """Each URL would reach the loopback listener through a filter that read it another way
    (or took the IPv6 form at face value); the private check is on."""
    listener = Listener()
    on = load_settings(fetch_image_urls=True)
    p = listener.port
    try:
        for url in (f"http://127.0.0.1:{p}\\@8.8.8.8/a.png", f"http://8.8.8.8@127.0.0.1:{p}/a.png",
                    f"http://[64:ff9b::7f00:1]:{p}/a.png", f"http://[2002:7f00:1::]:{p}/a.png",
                    f"http://[::127.0.0.1]:{p}/a.png", f"http://[::ffff:0:127.0.0.1]:{p}/a.png"):
            with pytest.raises(InvalidRequest) as e:
                load_image(url, on, "p")
            assert e.value.param == "p"
            assert "could not be reached" not in e.value.message, (url, e.value.message)
        assert listener.connections == 0
    finally:
        listener.close()


def test_slow_drip_server_cannot_stretch_the_fetch():
    """A byte every 50 ms never trips a per-read timeout; the deadline covers it all."""
    body = b"x" * 400
    listener = Listener(reply=b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n" + body, drip=0.05)
    s = load_settings(fetch_image_urls=True, fetch_allow_private=True, image_fetch_timeout=1)
    try:
        start = time.monotonic()
        with pytest.raises(InvalidRequest, match="took longer than 1 s"):
            load_image(listener.url + "/slow.png", s, "p")
        assert time.monotonic() - start < 1.5
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["http://[::1/a.png", "http://[zz]/a.png", "http://[::1]x/a.png"])
def test_bad_ipv6_literal_image_url_is_a_400_naming_the_part(client, url):
    """Checked in the web process before any job exists (these were 500s)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="synthetic-vision", messages=[{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert e.value.body["param"] == "messages[0].content[1].image_url.url"
