"""Image references in chat content, validated before a job is enqueued.

Accepted: ``data:image/<png|jpeg|gif|webp>;base64,...`` URLs whose bytes are an image of that
type and within ``max_image_bytes`` (decoded by ``web.images``), ``http(s)://`` URLs (fetched
only by a vision backend, under ``web.images``' limits), and — as Ollama accepts — bare base64
image bytes, which become a data URL. Anything else is a 400 naming the part.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from config.errors import InvalidRequest
from config.settings import Settings
from web.images import load_image
from web.schemas.chat import ImagePart, Message

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


def check_image_parts(messages: list[Message], settings: Settings) -> None:
    """Check every image part, replacing bare base64 by its data URL."""
    for i, m in enumerate(messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if isinstance(part, ImagePart):
                part.image_url.url = checked_image_url(
                    part.image_url.url, settings, f"messages[{i}].content[{j}].image_url.url")


def checked_image_url(url: str, settings: Settings, param: str) -> str:
    """The URL to pass on to the backend; a 400 naming ``param`` if it is not one."""
    url = url.strip()
    if url.startswith("data:"):
        mime = url[5:].partition(";")[0].lower()
        if mime not in _MAGIC:
            raise InvalidRequest(f"Unsupported image type '{mime}'; send png, jpeg, gif or "
                                 "webp.", param=param)
        if sniff(load_image(url, settings, param)) != mime:
            raise InvalidRequest(f"The data URL says {mime}, but its bytes are not a {mime} "
                                 "image.", param=param)
        return url
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        return url
    if "://" in url[:16]:
        raise InvalidRequest("Image URLs must be http(s) URLs with a host, or data URLs.",
                             param=param)
    return _bare_base64(url, settings, param)


def _bare_base64(text: str, settings: Settings, param: str) -> str:
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        data = b""
    mime = sniff(data)
    if mime is None:
        raise InvalidRequest("The image is neither a URL nor base64 of a png, jpeg, gif or "
                             "webp image.", param=param)
    if len(data) > settings.max_image_bytes:
        raise InvalidRequest(f"The image is larger than {settings.max_image_bytes} bytes.",
                             param=param)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
