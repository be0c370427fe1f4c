"""Export a sentence-transformers model's transformer to ONNX, and prove it before keeping it.

    python -m models.onnx_export <model directory> <target .onnx path>

Run by ``models/onnx_embeddings.py`` in a child process (this is the only place torch is
imported for that backend). The export is written next to the target, then checked: probe
texts of many lengths, embedded by the serving code path (``Runner``: tokenizers +
onnxruntime + numpy pooling) alone and in batches, must equal ``SentenceTransformer.encode``
to ``TOLERANCE``; only then is it moved into place. Exit status 1 with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from models.onnx_embeddings import INPUTS, Layout, Runner

TOLERANCE = 1e-5
OPSET = 17


def probes(max_tokens: int) -> list[str]:
    """Short and long, plain and not: casing, accents, CJK, emoji, digits, punctuation, and
    one text near the model's longest input."""
    texts = ["a", "Hello, world!", "The ferry leaves at 07:45 from pier 3.",
             "Ünïcödé àccents, naïve café, Straße", "東京の渡し船は朝早く出ます。",
             "emoji 🚢⛴️ and symbols ∑∫√ <tag> {json: true}", "   leading and trailing   ",
             "UPPER lower MiXeD 12345 67.89 -0.5e10", "tab\tand\nnewline"]
    words = "the quick brown fox jumps over the lazy dog near the harbour".split()
    texts += [" ".join(words[i % len(words)] for i in range(n)) for n in (20, 60, 120)]
    texts.append(" ".join(words[i % len(words)] for i in range(max_tokens - 12)))
    return texts


def export(path: Path, target: Path) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    layout = Layout(path)
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.eval()
    transformer = model[0].auto_model

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state

    example = model.tokenizer(["a short one", "and a somewhat longer example sentence"],
                              padding=True, return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "token_type_ids": {0: "batch", 1: "tokens"},
            "last_hidden_state": {0: "batch", 1: "tokens"}}
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=target.parent)
    os.close(fd)
    try:
        with torch.inference_mode():
            torch.onnx.export(LastHidden().eval(), tuple(example[n] for n in INPUTS), tmp,
                              input_names=list(INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        texts = probes(layout.max_seq_length)
        expected = model.encode(texts, batch_size=32, convert_to_numpy=True)
        runner = Runner(Path(tmp), layout)
        tokens = runner.tokenize(texts)
        reference_tokens = model.tokenizer(texts, add_special_tokens=True)["input_ids"]
        if tokens != [list(t) for t in reference_tokens]:
            raise SystemExit(f"{path}: tokenizer.json tokenizes differently from the model's "
                             f"tokenizer; not exported")
        together = runner.embed(tokens, batch_size=32)
        alone = np.concatenate([runner.embed([t], batch_size=1) for t in tokens])
        diff = float(max(np.abs(together - expected).max(), np.abs(alone - expected).max()))
        if not diff <= TOLERANCE:
            raise SystemExit(f"{path}: ONNX vectors differ from sentence-transformers' by "
                             f"{diff:.2e} (> {TOLERANCE}); not exported")
        (target.parent / "check.json").write_text(json.dumps(
            {"model": str(path), "probes": len(texts), "max_abs_diff": diff,
             "tolerance": TOLERANCE, "torch": torch.__version__}) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return f"exported {path} to {target}; max |onnx - sentence-transformers| = {diff:.2e}"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(export(Path(argv[0]), Path(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
