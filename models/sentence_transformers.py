"""Embedding models run by sentence-transformers on torch (CPU), loaded from a local directory.

``embed`` reproduces ``SentenceTransformer.encode``: inputs sorted by length into passes of
``batch_size`` (less padding), the model's own modules (pooling, normalisation) applied; the
vectors equal ``encode``'s to float32 precision (``tests/test_embeddings.py`` checks 1e-5).
Nothing is downloaded: the weights directory is local and the hub is set offline first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from config.settings import ModelEntry
from models.base import EmbeddingBackend, EmbeddingOptions, by_length


class SentenceTransformersBackend(EmbeddingBackend):
    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self.options = EmbeddingOptions.model_validate(entry.options)
        if self.options.n_threads:
            torch.set_num_threads(self.options.n_threads)
        path = entry.weights_path()
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"model {entry.name!r}: no sentence-transformers model at {path}")
        self._torch = torch
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.dimensions = self.model.get_embedding_dimension()
        self.max_tokens = min(entry.num_ctx, self.model.max_seq_length or entry.num_ctx)
        self.vocab_size = len(self.tokenizer)
        self._batching(self.options)

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]

    def embed(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        return by_length(token_lists, self.batch_size, self.dimensions, self._pass)

    def _pass(self, token_lists: list[list[int]]) -> np.ndarray:
        features = self.tokenizer.pad({"input_ids": token_lists}, return_tensors="pt")
        with self._torch.inference_mode():
            rows = self.model(dict(features))["sentence_embedding"]
        return rows.float().numpy()
