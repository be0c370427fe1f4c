"""The llama.cpp build itself: known miscompilations must not reach users.

A default (-march=native) build of llama-cpp-python 0.3.36 segfaults in
ggml_backend_amx_mul_mat on the first multi-token prompt on AMX CPUs (llama.cpp #20824), and
its llamafile sgemm path gave wrong logits for batched prompts on AVX-512 CPUs. Both show up
only when a prompt of several tokens is evaluated in one batch, so that is what this does, in
a subprocess, comparing the last logits of a batched evaluation with a token-by-token one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

CHECK = r"""
import numpy as np
from config import load_settings
from llama_cpp import Llama
path = str(load_settings().models[0].weights_path())
text = b"<|im_start|>user\nSay hello, and tell me about the weather today.<|im_end|>\n<|im_start|>assistant\n"
def last_logits(n_batch):
    llm = Llama(model_path=path, n_ctx=256, n_batch=n_batch, n_threads=2, verbose=False)
    toks = llm.tokenize(text, special=True)
    llm.eval(toks)
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()
one, batched = last_logits(1), last_logits(64)
print(float(np.abs(one - batched).max()), int(one.argmax()), int(batched.argmax()))
"""


def test_batched_prompt_matches_token_by_token():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"llama.cpp crashed on a batched prompt:\n{out.stderr[-2000:]}"
    diff, a, b = out.stdout.split()
    assert a == b, "batched evaluation picks a different next token"
    assert float(diff) < 0.05, f"batched logits differ by {diff}"
