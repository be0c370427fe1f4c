"""Sentence-transformers embedding models run by onnxruntime: the same vectors, about twice
the throughput on a CPU, and no torch in the serving process.

The weights directory is a sentence-transformers model (Transformer -> mean Pooling ->
Normalize, the layout of all-MiniLM-L6-v2 and its kin); other layouts are refused with a
pointer to the ``sentence_transformers`` backend. The transformer is exported to ONNX once per
set of weights, by ``models/onnx_export.py`` in a child process (torch is imported there, never
here), which writes the file only after checking that its vectors equal
``SentenceTransformer.encode``'s to 1e-5. The file is cached under ``export_dir`` by a hash of
the weights, so a worker starting again, or another worker on the same host, reuses it.

Tokenization reads the model's ``tokenizer.json`` with ``tokenizers``, the library behind the
tokenizer sentence-transformers uses; padding and pooling are done here with numpy as
sentence-transformers does them (mean over the attention mask, then L2 normalisation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from config.settings import ModelEntry
from models.base import EmbeddingBackend, EmbeddingOptions, by_length

log = logging.getLogger(__name__)

# Bump when the exported graph's inputs, outputs or export settings change: the cache key.
EXPORT_FORMAT = "ferry-onnx-1"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _default_export_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ferry", "onnx")


class OnnxOptions(EmbeddingOptions):
    # Where exported models are kept (one subdirectory per set of weights).
    export_dir: str = Field(default_factory=_default_export_dir)


class Layout:
    """What a sentence-transformers model directory says about its pipeline, checked to be one
    this backend reproduces exactly."""

    def __init__(self, path: Path):
        self.path = path
        try:
            modules = json.loads((path / "modules.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no sentence-transformers model at {path}") from None
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling", "Normalize"], ["Transformer", "Pooling"]):
            raise ValueError(f"{path}: modules {kinds} are not Transformer, Pooling[, Normalize]; "
                             f"serve this model with backend = \"sentence_transformers\"")
        self.normalize = kinds[-1] == "Normalize"
        pooling = json.loads((path / modules[1]["path"] / "config.json").read_text())
        modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{path}: pooling {modes} is not mean pooling; serve this model "
                             f"with backend = \"sentence_transformers\"")
        self.dimensions = int(pooling["word_embedding_dimension"])
        st = json.loads((path / "sentence_bert_config.json").read_text())
        if st.get("do_lower_case"):
            raise ValueError(f"{path}: do_lower_case is not supported here; serve this model "
                             f"with backend = \"sentence_transformers\"")
        self.max_seq_length = int(st["max_seq_length"])
        weights = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not weights or not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: needs model.safetensors (or pytorch_model.bin) "
                                    f"and tokenizer.json")
        self.weights = weights[0]

    def export_key(self) -> str:
        """Names the export of these weights: a hash of what the exported graph is made of."""
        h = hashlib.sha256(EXPORT_FORMAT.encode())
        for f in (self.weights, self.path / "config.json"):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()[:32]


class Runner:
    """The exported transformer plus mean pooling and normalisation: token lists in, rows out.
    Shared by the backend and by the export's check against sentence-transformers."""

    def __init__(self, onnx_path: Path, layout: Layout, n_threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = n_threads
        opts.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: this process shares its cores with the
        # worker's other threads (and, on small hosts, with Redis and the web).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(layout.path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.normalize = layout.normalize
        self.dimensions = layout.dimensions
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def embed(self, token_lists: Sequence[list[int]], batch_size: int) -> np.ndarray:
        """Rows in input order, in passes of ``batch_size`` over length-sorted inputs."""
        return by_length(token_lists, batch_size, self.dimensions, self._pass)

    def _pass(self, token_lists: list[list[int]]) -> np.ndarray:
        width = len(max(token_lists, key=len))
        ids = np.zeros((len(token_lists), width), dtype=np.int64)
        mask = np.zeros((len(token_lists), width), dtype=np.int64)
        for row, tokens in enumerate(token_lists):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                         "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[:, :, None].astype(np.float32)
        rows = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.normalize:
            rows /= np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)
        return rows


def exported(layout: Layout, export_dir: str | os.PathLike) -> Path:
    """The ONNX file for these weights, exported (and checked) first if it is not cached."""
    target = Path(export_dir) / layout.export_key() / "model.onnx"
    if target.is_file():
        return target
    log.info("exporting %s to ONNX at %s (once per set of weights)", layout.path, target)
    proc = subprocess.run([sys.executable, "-m", "models.onnx_export", str(layout.path), str(target)],
                          capture_output=True, text=True, timeout=1800,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0 or not target.is_file():
        raise RuntimeError(f"exporting {layout.path} to ONNX failed:\n{proc.stderr[-4000:]}")
    log.info("%s", proc.stdout.strip())
    return target


class OnnxEmbeddingBackend(EmbeddingBackend):
    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        self.options = OnnxOptions.model_validate(entry.options)
        layout = Layout(entry.weights_path())
        self.runner = Runner(exported(layout, self.options.export_dir), layout,
                             self.options.n_threads)
        self.dimensions = self.runner.dimensions
        self.max_tokens = min(entry.num_ctx, layout.max_seq_length)
        self.vocab_size = self.runner.vocab_size
        self._batching(self.options)

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        return self.runner.tokenize(texts)

    def embed(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        return self.runner.embed(token_lists, self.batch_size)
