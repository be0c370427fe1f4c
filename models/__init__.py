"""Model backends. Knows nothing of HTTP or Celery.

Backends are imported only when a worker loads one, and only if their engine is installed,
so the CPU default never imports torch-on-CUDA or exllamav2.
"""

from __future__ import annotations

import importlib
import importlib.util

from config.settings import ModelEntry
from models.base import BaseBackend

# backend name -> (module, class, the engine package it needs)
_BACKENDS = {
    "llama_cpp": ("models.llama_cpp", "LlamaCppBackend", "llama_cpp"),
    "exllamav2": ("models.exllamav2.backend", "ExLlamaV2Backend", "exllamav2"),
    "sentence_transformers": ("models.sentence_transformers", "SentenceTransformersBackend",
                              "sentence_transformers"),
    "onnxruntime": ("models.onnx_embeddings", "OnnxEmbeddingBackend", "onnxruntime"),
    "synthetic": ("models.synthetic", "SyntheticBackend", None),
}


def available() -> list[str]:
    return [n for n, (_, _, dep) in _BACKENDS.items() if dep is None or importlib.util.find_spec(dep)]


def backend_class(entry: ModelEntry) -> type[BaseBackend]:
    """The entry's backend class, without loading a model (nor importing its engine)."""
    try:
        module, cls, dep = _BACKENDS[entry.backend]
    except KeyError:
        raise RuntimeError(f"model {entry.name!r}: no backend {entry.backend!r} in this build") from None
    if dep and importlib.util.find_spec(dep) is None:
        raise RuntimeError(f"model {entry.name!r}: backend {entry.backend!r} needs the package "
                           f"{dep!r}, which is not installed")
    return getattr(importlib.import_module(module), cls)


def load_backend(entry: ModelEntry) -> BaseBackend:
    backend = backend_class(entry)(entry)
    if entry.vision and not getattr(backend, "supports_vision", False):
        # The web sends this model's images on because the registry says it takes them.
        backend.close()
        raise RuntimeError(f"model {entry.name!r}: the registry says vision = true, but its "
                           f"{entry.backend} backend has no image input for it")
    return backend
