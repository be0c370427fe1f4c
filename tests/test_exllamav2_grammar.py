"""ExLlamaV2's constraints below the GPU line: Ferry's mask filter (models/exllamav2/grammar.py)
over real llguidance grammars compiled for SmolLM2's real tokenizer.json (rebuilt from the
GGUF the CPU default serves), driven as exllamav2 0.3.2's sampler drives a filter: begin,
the mask computed (in a pool, as the generator's background worker does), the logits masked,
the sampled token fed. No exllamav2, no GPU, no services."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from config.errors import GenerationFailed
from models import guidance
from models.constraints import Constraint
from models.exllamav2.grammar import failure_of
from tests import exl2_model_dirs as dirs
from tests.exl2_doubles import MaskFilterDouble

pytest.importorskip("llguidance")
tokenizers = pytest.importorskip("tokenizers")

GGUF = dirs.smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="the SmolLM2 weights package is not installed")
ENDOFTEXT, IM_END = 0, 2
N_VOCAB = 49152
CALL_SCHEMA = {"type": "object", "properties": {"name": {"const": "get_time"},
                                                "arguments": {"type": "object"}},
               "required": ["name", "arguments"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return dirs.smollm2(tmp_path_factory.mktemp("smollm2"), GGUF)


@pytest.fixture(scope="module")
def hf(model_dir):
    return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def lltok(model_dir):
    return guidance.tokenizer_from_hf((model_dir / "tokenizer.json").read_text(), N_VOCAB,
                                      [IM_END, ENDOFTEXT])


def encode(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


def new_filter(lltok, constraint: Constraint) -> MaskFilterDouble:
    grammar = guidance.compile_grammar(constraint, lltok, N_VOCAB, "response_format")
    f = MaskFilterDouble(None, SimpleNamespace(eos_token_id=IM_END), grammar)
    f.background_drop()
    f.begin("")
    return f


def allowed_after_mask(f, width: int = N_VOCAB) -> torch.Tensor:
    """What the sampler's mask path leaves: get_next(mask=True), then mask_logits."""
    assert f.get_next(mask=True) is True
    logits = f.mask_logits(torch.zeros(width))
    return logits != float("-inf")


def test_the_rebuilt_tokenizer_json_tokenizes_as_llama_cpp(hf):
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    try:
        for text in ('{"name": "get_weather", "arguments": {"city": "Oslo 12345"}}',
                     "<|im_start|>user\nHi ünïcödé 🚀<|im_end|>"):
            assert encode(hf, text) == vocab.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        vocab.close()
    assert hf.get_vocab_size() == N_VOCAB


def test_the_mask_walks_a_valid_reply_and_holds_off_the_end_tokens(hf, lltok):
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                               "tags": {"type": "array", "maxItems": 2,
                                                        "items": {"type": "string"}}},
              "required": ["n", "tags"], "additionalProperties": False}
    f = new_filter(lltok, Constraint(schema))
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        # Inside the strings too: the end tokens' text would fit in JSON, but they are
        # control tokens, which the grammar never allows (formatron's vocabulary did).
        for tok in encode(hf, '{"n": 3, "tags": ["a", "b"]}'):
            allowed = allowed_after_mask(f)
            assert allowed[tok] and not allowed[IM_END] and not allowed[ENDOFTEXT]
            f.feed(torch.tensor([[tok]]))
            f.background_prepare_logit_mask(pool)  # as the generator schedules it
        allowed = allowed_after_mask(f)
    finally:
        pool.shutdown()
    # Complete: only the end tokens, either of which ends the job as a stop condition.
    assert allowed.nonzero().flatten().tolist() == [ENDOFTEXT, IM_END]
    f.feed(torch.tensor([[IM_END]]))
    assert f.mask.stopped and f.failure is None
    # A mask scheduled after the last token (the job has ended) is harmless: end tokens.
    assert allowed_after_mask(f).nonzero().flatten().tolist() == [ENDOFTEXT, IM_END]


def test_a_third_item_is_refused(hf, lltok):
    schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 2}
    f = new_filter(lltok, Constraint(schema))
    for tok in encode(hf, "[1, 2"):
        f.feed(tok)
    allowed = allowed_after_mask(f)
    assert not allowed[encode(hf, ",")[0]] and allowed[encode(hf, "]")[0]]


def test_logits_wider_than_the_vocabulary_are_cut_off(lltok):
    f = new_filter(lltok, Constraint({"type": "object"}))
    allowed = allowed_after_mask(f, width=N_VOCAB + 64)  # the head padded to a multiple of 32
    assert not allowed[N_VOCAB:].any() and allowed[:N_VOCAB].any()


def test_the_allowed_token_path_agrees_with_the_mask(hf, lltok):
    f = new_filter(lltok, Constraint({"type": "object"}))
    for tok in encode(hf, '{"a": tr'):
        f.feed(tok)
    allowed, end = f.next()
    assert isinstance(allowed, set) and end == set()
    assert allowed == set(allowed_after_mask(f).nonzero().flatten().tolist())
    assert encode(hf, "ue")[0] in allowed and IM_END not in allowed


def test_a_refused_token_fails_the_choice_not_the_generator(hf, lltok):
    f = new_filter(lltok, Constraint({"type": "object"}))
    f.feed(encode(hf, "hello")[0])  # never raises: it would fail every job of the worker
    assert isinstance(f.failure, GenerationFailed) and "refused" in str(f.failure)
    assert failure_of([f]) is f.failure and failure_of([]) is None
    # The job ends at once, with an end token; the loop then fails this choice alone.
    assert allowed_after_mask(f).nonzero().flatten().tolist() == [ENDOFTEXT, IM_END]
    f.begin("")  # begun again, it starts over
    assert f.failure is None and allowed_after_mask(f)[encode(hf, "{")[0]]


def test_auto_tool_choice_is_a_call_or_plain_text(hf, lltok):
    c = Constraint(CALL_SCHEMA, text_allowed=True, is_tool_call=True)
    f = new_filter(lltok, c)
    first = allowed_after_mask(f)
    assert first[encode(hf, "{")[0]] and first[encode(hf, "Hello")[0]]
    for no in (IM_END, ENDOFTEXT, encode(hf, " ")[0], encode(hf, "\n")[0]):
        assert not first[no]  # no empty reply, no blank start, nothing opening like a call
    for tok in encode(hf, "It is 3 pm."):
        f.feed(tok)
    text = allowed_after_mask(f)
    assert text[IM_END] and text[encode(hf, " {")[0]]  # text may end, or go on freely
    # A call: the grammar is the CPU backend's, so the name is held to the tools'.
    f.begin("")
    for tok in encode(hf, '{"name": "get_'):
        f.feed(tok)
    assert not allowed_after_mask(f)[encode(hf, "weather")[0]]
    for tok in encode(hf, 'time", "arguments": {}}'):
        f.feed(tok)
    assert f.failure is None
    assert allowed_after_mask(f).nonzero().flatten().tolist() == [ENDOFTEXT, IM_END]


def test_one_grammar_many_filters(hf, lltok):
    grammar = guidance.compile_grammar(Constraint({"type": "object"}), lltok, N_VOCAB, "p")
    a, b = (MaskFilterDouble(None, None, grammar) for _ in range(2))
    a.begin("")
    b.begin("")
    for tok in encode(hf, '{"a": 1}'):
        a.feed(tok)
    assert a.mask.matcher is not b.mask.matcher
    assert allowed_after_mask(b)[encode(hf, "{")[0]]
    assert not allowed_after_mask(a)[encode(hf, "{")[0]]


def test_the_tokenizer_reads_every_token_and_the_end_ids(lltok, hf):
    assert lltok.vocab_size == N_VOCAB and sorted(lltok.eos_tokens) == [ENDOFTEXT, IM_END]
    text = json.dumps({"städte": ["Zürich", "Kraków"]}, ensure_ascii=False)
    assert lltok.tokenize_str(text) == encode(hf, text)
