"""Image inputs: base64 data URLs decoded, http(s) URLs fetched under limits.

Fetching is off unless ``FERRY_FETCH_IMAGE_URLS`` is set. When on, it goes through
``config/network.py`` as webhooks do: public addresses only, the connection pinned to the
address that was checked, no redirects, and ``image_fetch_timeout`` over the whole transfer;
the size is capped by ``max_image_bytes``.
"""

from __future__ import annotations

import base64
import binascii

from config import network
from config.errors import InvalidRequest
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
    target = network.target(url, allow_private=settings.fetch_allow_private, param=param,
                            what="image URL")
    reply = network.send(target, "GET", timeout=settings.image_fetch_timeout,
                         headers={"User-Agent": "ferry"}, max_bytes=settings.max_image_bytes)
    if reply.status != 200:
        raise InvalidRequest(f"Fetching the image gave HTTP {reply.status}.", param=param)
    return reply.body
