"""Image inputs: base64 data URLs decoded, http(s) URLs fetched under limits.

Fetching is off unless ``FERRY_FETCH_IMAGE_URLS`` is set. When on, the host must resolve to
public addresses (``config/network.py``), the connection goes to the address that was
checked (the URL's host is sent as Host/SNI), redirects are not followed, and both the size
and the total time are capped.
"""

from __future__ import annotations

import base64
import binascii
import time
from urllib.parse import urlsplit

import urllib3

from config.errors import InvalidRequest
from config.network import public_addresses
from config.settings import Settings


def load_image(url: str, settings: Settings, param: str) -> bytes:
    if url.startswith("data:"):
        return _from_data_url(url, settings.max_image_bytes, param)
    if not settings.fetch_image_urls:
        raise InvalidRequest("Fetching image URLs is disabled on this server; send the image "
                             "as a base64 data URL.", param=param)
    return _fetch(url, settings, param)


def _from_data_url(url: str, limit: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InvalidRequest("Image data URLs must look like data:image/<type>;base64,<data>.",
                             param=param)
    if len(payload) * 3 // 4 > limit:
        raise InvalidRequest(f"The image is larger than {limit} bytes.", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The image data URL is not valid base64.", param=param) from None


def _fetch(url: str, settings: Settings, param: str) -> bytes:
    host, port, addresses = public_addresses(url, allow_private=settings.fetch_allow_private,
                                             param=param, what="image URL")
    scheme = url.split(":", 1)[0]
    deadline = time.monotonic() + settings.image_fetch_timeout
    kw = {"server_hostname": host, "assert_hostname": host} if scheme == "https" else {}
    pool = urllib3.connection_from_url(f"{scheme}://{addresses[0]}:{port}", retries=False,
                                       timeout=settings.image_fetch_timeout, **kw)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        resp = pool.urlopen("GET", path, headers={"Host": host, "User-Agent": "ferry"},
                            redirect=False, preload_content=False)
        if resp.status != 200:
            raise InvalidRequest(f"Fetching the image gave HTTP {resp.status}.", param=param)
        data = bytearray()
        for chunk in resp.stream(65536):
            data += chunk
            if len(data) > settings.max_image_bytes:
                raise InvalidRequest(f"The image is larger than {settings.max_image_bytes} "
                                     "bytes.", param=param)
            if time.monotonic() > deadline:
                raise InvalidRequest("Fetching the image took too long.", param=param)
        return bytes(data)
    except urllib3.exceptions.HTTPError as e:
        raise InvalidRequest(f"The image could not be fetched: {e}", param=param) from None
    finally:
        pool.close()

