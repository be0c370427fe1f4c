"""Image references in chat content: validated here, decoded by vision backends.

Accepted: ``data:image/<png|jpeg|gif|webp>;base64,...`` URLs whose bytes are an image of that
type, ``http(s)://`` URLs (fetched by the vision backend, not by the web process), and — as
Ollama accepts — bare base64 image bytes, which are turned into a data URL.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+);base64,(.*)", re.S | re.I)
# What each accepted type's file starts with.
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}


def sniff(data: bytes) -> str | None:
    for mime, magics in _MAGIC.items():
        if data.startswith(magics) and (mime != "image/webp" or data[8:12] == b"WEBP"):
            return mime
    return None


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the image is not valid base64") from None


def normalize_image_url(url: str) -> str:
    """The URL to pass on, or ValueError saying what is wrong with it."""
    url = url.strip()
    m = _DATA_URL.fullmatch(url)
    if m:
        mime = m.group(1).lower()
        if mime not in _MAGIC:
            raise ValueError(f"unsupported image type {mime}; send png, jpeg, gif or webp")
        data = _b64(m.group(2))
        if sniff(data) != mime:
            raise ValueError(f"the data URL says {mime} but its bytes are not a {mime} image")
        return url
    if url.startswith("data:"):
        raise ValueError("a data URL must look like data:image/png;base64,<data>")
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError("the image URL has no host")
        return url
    if "://" in url[:16]:
        raise ValueError(f"image URLs must be http(s) or data URLs, not {parts.scheme}:")
    data = _b64(url)
    mime = sniff(data)
    if mime is None:
        raise ValueError("the image is neither a URL nor base64 of a png, jpeg, gif or webp")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
