"""Images for ExLlamaV2 vision models, below the GPU line.

The web process has already turned every image part into bytes (``job.images``, base64) and
the part into ``{"type": "image", "image": k}``. Here, in the task thread, the images are
decoded with Pillow (a bad image is a 400 before anything is queued); on the loop thread,
``EmbeddingCache`` gives each one its ``ExLlamaV2MMEmbedding`` (the vision tower's output,
computed by engine.py), reusing the one made for the same bytes recently: an embedding's
token ids are unique for the life of the process, so only the same object gives a prompt
that repeats an image a prefix-cache hit. ``with_aliases`` then writes each embedding's
text alias where its image part was.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.errors import InvalidRequest
from models.base import IMAGE_PARTS

# ExLlamaV2's vision towers take images up to this many pixels per side (vision_max_size).
MAX_SIDE = 16384
# Recent images whose embeddings are kept (TabbyAPI kept 20).
CACHE_SIZE = 20


@dataclass(frozen=True)
class JobImage:
    digest: str    # sha256 of the image file: the cache key
    image: Any     # a PIL image, RGB
    param: str     # where it was in the request, for errors


def image_parts(messages: list[dict[str, Any]]):
    """(message index, part index, part) of every image part, in order."""
    for i, m in enumerate(messages):
        content = m.get("content")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                yield i, j, part


def decode_images(messages: list[dict[str, Any]], images: list[str]) -> list[JobImage]:
    """The images in the order their parts appear (one per part, repeats included)."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    out: list[JobImage] = []
    for i, j, part in image_parts(messages):
        param = f"messages[{i}].content[{j}]"
        k = part.get("image")
        if part.get("type") != "image" or not isinstance(k, int) or not 0 <= k < len(images):
            raise InvalidRequest("This image part was not resolved to image bytes before "
                                 "the job was queued.", param=param)
        try:
            data = base64.b64decode(images[k], validate=True)
            with Image.open(io.BytesIO(data)) as img:
                if max(img.size) > MAX_SIDE:
                    raise InvalidRequest(f"The image is {img.size[0]}x{img.size[1]} pixels; "
                                         f"this model takes at most {MAX_SIDE} per side.",
                                         param=param)
                pil = img.convert("RGB")
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError,
                DecompressionBombError) as e:
            raise InvalidRequest(f"The image could not be decoded: {e}", param=param) from None
        out.append(JobImage(hashlib.sha256(data).hexdigest(), pil, param))
    return out


class EmbeddingCache:
    """Least recently used embeddings by image digest. Touched by the loop thread only."""

    def __init__(self, make: Callable[[Any], Any], size: int = CACHE_SIZE):
        self.make, self.size = make, size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0

    def embeddings(self, images: list[JobImage]) -> list[Any]:
        return [self.get(img) for img in images]

    def get(self, img: JobImage) -> Any:
        found = self._items.get(img.digest)
        if found is not None:
            self.hits += 1
            self._items.move_to_end(img.digest)
            return found
        self.misses += 1
        made = self.make(img.image)
        self._items[img.digest] = made
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return made


def with_aliases(messages: list[dict[str, Any]], aliases: list[str]) -> list[dict[str, Any]]:
    """Messages with list content flattened to text, each image part replaced by the next
    alias (the text the tokenizer turns into that image's embedding token ids)."""
    out, n = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        text = []
        for part in content:
            if part.get("type") in IMAGE_PARTS:
                text.append(aliases[n])
                n += 1
            elif part.get("type") == "text":
                text.append(part.get("text", ""))
        out.append({**m, "content": "".join(text)})
    return out
