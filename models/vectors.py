"""Embedding vectors on the wire and after the model: shortening and base64 float32."""

from __future__ import annotations

import base64

import numpy as np

from config.errors import InvalidRequest

# OpenAI's base64 encoding is the raw little-endian float32 array (what its client decodes).
FLOAT32_LE = np.dtype("<f4")


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Keep the first ``dimensions`` components and scale each row back to unit length,
    as OpenAI's ``dimensions`` parameter does. Larger than the model's size is a 400."""
    size = vectors.shape[1]
    check_dimensions(dimensions, size)
    if dimensions is None or dimensions == size:
        return vectors
    cut = vectors[:, :dimensions].astype(np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.where(norms == 0, 1, norms)


def check_dimensions(dimensions: int | None, size: int) -> None:
    if dimensions is not None and dimensions > size:
        raise InvalidRequest(f"This model's embeddings have {size} dimensions; dimensions "
                             f"must be at most {size}.", param="dimensions")


def to_base64(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype=FLOAT32_LE).tobytes()).decode()


def from_base64(data: str, dimensions: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype=FLOAT32_LE).reshape(-1, dimensions)
