"""Image references in chat content, validated before a job is enqueued.

Accepted: ``data:image/<png|jpeg|gif|webp>;base64,...`` URLs whose bytes are an image of that
type and within ``max_image_bytes`` (decoded by ``tasks.core.images``), ``http(s)://`` URLs (fetched
only for a vision model, under ``tasks.core.images``' limits), and — as Ollama accepts — bare base64
image bytes, which become a data URL. Anything else is a 400 naming the part.

Which models take images is the registry's ``vision`` flag: images for any other model are a
400 here, before anything is queued. For a vision model ``attach_images`` resolves every image
part to bytes in this process (so workers never reach out to the network) and passes them in
the job (``GenerationJob.images``).
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from typing import Any

from config.errors import InvalidRequest, PayloadTooLarge, Unsupported
from config.settings import ModelEntry, Settings
from tasks.core.images import load_image
from tasks.core.schemas.chat import ImagePart, Message

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
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracketed host that is no IPv6 address, or an unclosed bracket
        parts = None
    if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
        return url
    if parts is None or "://" in url[:16]:
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


def job_images(entry: ModelEntry, messages: list[Message], for_template: list[dict[str, Any]],
               settings: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """The job's messages and images: unchanged and none without image parts; a 400 if the
    model takes no images; else every image part resolved (``attach_images``)."""
    with_images = [i for i, m in enumerate(messages) if m.has_images()]
    if not with_images:
        return for_template, []
    if not entry.vision:
        raise Unsupported(f"The model '{entry.name}' has no image input; send text only.",
                          param=f"messages[{with_images[0]}].content")
    return attach_images(for_template, settings)


def attach_images(messages: list[dict[str, Any]], settings: Settings
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """Each ``image_url`` part as ``{"type": "image", "image": k}``, and the images' bytes as
    base64 (data URLs decoded, http(s) URLs fetched). Together they may not exceed the body
    limit: fetched images would otherwise make a job of any size."""
    images: list[str] = []
    total = 0
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if part.get("type") != "image_url":
                parts.append(part)
                continue
            param = f"messages[{i}].content[{j}].image_url.url"
            data = load_image(part["image_url"]["url"], settings, param)
            if sniff(data) is None:
                raise InvalidRequest("The image is not a png, jpeg, gif or webp image.",
                                     param=param)
            total += len(data)
            if total > settings.max_body_bytes:
                raise PayloadTooLarge(f"The request's images add up to more than "
                                      f"{settings.max_body_bytes} bytes.", param=param)
            parts.append({"type": "image", "image": len(images)})
            images.append(base64.b64encode(data).decode())
        out.append({**m, "content": parts})
    return out, images
