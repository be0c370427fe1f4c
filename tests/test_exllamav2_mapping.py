"""ExLlamaV2 backend below the GPU line: options, sampling settings, stop conditions,
chat templates of model directories, and result dicts -> events. No exllamav2 import."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from pydantic import ValidationError

from config.errors import InvalidRequest
from config.contract.events import Delta, Finish
from models.exllamav2.model_dir import ModelDir
from models.exllamav2.options import ExLlamaV2Options
from models.exllamav2.results import FLOOR_LOGPROB, ChoiceStream
from models.exllamav2.sampling import SETTINGS_FIELDS, settings_fields, token_bias
from models.exllamav2.spec import JobSpec, job_kwargs
from models.exllamav2.stops import stop_conditions
from config.contract.job import Sampling
from models.templates import ChatTemplate, end_of_turn, find_chat_template
from tests import exl2_model_dirs as dirs
from tests.exl2_doubles import JobDouble

# The fields of exllamav2 0.3.2's ExLlamaV2Sampler.Settings, listed here independently of
# the backend's own list (generator/sampler.py in the 0.3.2 wheel).
SETTINGS_0_3_2 = {
    "token_repetition_penalty", "token_repetition_range", "token_repetition_decay",
    "token_frequency_penalty", "token_presence_penalty", "temperature", "smoothing_factor",
    "min_temp", "max_temp", "temp_exponent", "top_k", "top_p", "top_a", "min_p", "tfs",
    "typical", "skew", "temperature_last", "mirostat", "mirostat_tau", "mirostat_eta",
    "mirostat_mu", "token_bias", "cfg_scale", "post_sampling_hooks", "dry_allowed_length",
    "dry_base", "dry_multiplier", "dry_sequence_breakers", "dry_range", "dry_max_ngram",
    "ngram_trie", "ngram_index", "ngram_history", "xtc_probability", "xtc_threshold",
    "xtc_ignore_tokens",
}
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


# --- sampling ---------------------------------------------------------------------------------

def test_every_settings_field_is_set():
    fields = settings_fields(Sampling(), None)
    assert set(fields) == SETTINGS_FIELDS == SETTINGS_0_3_2


def test_openai_sampling_mapping_neutralises_exllamav2_defaults():
    f = settings_fields(Sampling(temperature=0.7, top_p=0.9, frequency_penalty=0.5,
                                 presence_penalty=-0.25), None)
    assert (f["temperature"], f["top_p"], f["top_k"]) == (0.7, 0.9, 0)
    assert (f["token_frequency_penalty"], f["token_presence_penalty"]) == (0.5, -0.25)
    # HF-style multiplicative penalty off; the OpenAI window starts empty (no prompt tokens).
    assert (f["token_repetition_penalty"], f["token_repetition_range"]) == (1.0, 0)
    assert f["min_p"] == f["top_a"] == f["tfs"] == f["typical"] == f["skew"] == 0
    assert f["mirostat"] is False and f["dry_multiplier"] == 0 and f["xtc_probability"] == 0
    assert f["cfg_scale"] is None and f["token_bias"] is None and f["temperature_last"] is False


def test_top_k_is_passed_on():
    assert settings_fields(Sampling(temperature=0.7, top_k=5), None)["top_k"] == 5


def test_temperature_zero_is_greedy():
    f = settings_fields(Sampling(temperature=0, top_p=0.5), None)
    assert f["temperature"] < 0.01 and f["top_k"] == 1


def test_stateful_fields_are_fresh_per_job():
    a, b = settings_fields(Sampling(), None), settings_fields(Sampling(), None)
    for name in ("ngram_history", "post_sampling_hooks", "dry_sequence_breakers"):
        assert a[name] is not b[name]


def test_logit_bias_becomes_a_padded_dense_bias():
    bias = token_bias({5: 2.5, 7: -100, 0: -3}, vocab_size=100)
    assert bias.dtype == torch.float32 and bias.shape == (128,)
    assert bias[5] == 2.5 and bias[0] == -3 and bias[7] == -math.inf
    assert bias.abs().sum() != 0 and bias[[1, 2, 99, 127]].eq(0).all()
    assert token_bias({}, 100) is None
    with pytest.raises(InvalidRequest) as e:
        token_bias({100: 1.0}, vocab_size=100)
    assert e.value.param == "logit_bias"


def test_job_kwargs_match_the_job_signature_and_ask_probabilities_only_for_logprobs():
    ids = torch.tensor([[1, 2, 3]])
    base = dict(input_ids=(1, 2, 3), max_new_tokens=8, settings={}, seed=3,
                stop_conditions=(2, "\n\n"))
    plain = job_kwargs(JobSpec(**base), 41, ids, object())
    assert set(plain) <= set(inspect.signature(JobDouble).parameters)
    job = JobDouble(**plain)  # no **kwargs: a misspelt name would raise here
    assert job.identifier == 41 and job.seed == 3 and job.max_new_tokens == 8
    assert job.stop_tokens == {2} and job.stop_strings == {"\n\n"}
    assert (job.return_top_tokens, job.return_probs, job.return_logits) == (0, False, False)
    top = JobDouble(**job_kwargs(JobSpec(**base, top_logprobs=3), 1, ids, object()))
    assert (top.return_top_tokens, top.return_probs, top.return_logits) == (3, True, False)
    chosen_only = JobDouble(**job_kwargs(JobSpec(**base, top_logprobs=0), 1, ids, object()))
    assert (chosen_only.return_top_tokens, chosen_only.return_probs) == (0, True)


# --- options ------------------------------------------------------------------------------------

def test_options_defaults_and_limits():
    opts = ExLlamaV2Options()
    lim = opts.limits(num_ctx=4000)
    assert lim.cache_tokens == 4096 and lim.chunk == 2048 and lim.max_seq_len == 4000
    assert opts.worker_threads() >= opts.max_batch_size
    small = ExLlamaV2Options(max_batch_size=4).limits(num_ctx=1000)
    assert small.chunk == 768  # clamped within the context, still whole pages


def test_options_with_draft_reserve_its_tokens():
    opts = ExLlamaV2Options(draft={"weights": "/m/draft", "num_draft_tokens": 4})
    assert opts.limits(num_ctx=4096).cache_tokens == 4352  # 4096 + 4, in whole pages


@pytest.mark.parametrize("options,message", [
    ({"cache_size": 1000}, "multiple of 256"),
    ({"max_chunk_size": 300}, "multiple of 256"),
    ({"cache_type": "FP8"}, "cache_type"),
    ({"max_seq_len": 4096}, "num_ctx"),
    ({"gpu_split": "half"}, "gpu_split"),
    ({"flash": True}, "flash"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValidationError, match=message):
        ExLlamaV2Options.model_validate(options)


@pytest.mark.parametrize("options,num_ctx,message", [
    ({"cache_size": 2048}, 4096, "cannot hold one full context"),
    ({"max_batch_size": 64, "max_chunk_size": 256}, 4096, "chunk of at least 512"),
    ({}, 100, "at least 256"),
])
def test_inconsistent_sizes_are_refused(options, num_ctx, message):
    with pytest.raises(ValueError, match=message):
        ExLlamaV2Options.model_validate(options).limits(num_ctx)


# --- model directories: stop tokens and templates ------------------------------------------

def test_stop_tokens_of_llama31(tmp_path):
    md = ModelDir.read(dirs.llama31(tmp_path))
    template = md.chat_template()
    assert md.eos_ids() == {128001, 128008, 128009}
    assert md.end_of_turn_id(template) == 128009
    assert stop_conditions(md.eos_ids(), ["\n\nUser:", "", "###"]) == (
        128001, 128008, 128009, "\n\nUser:", "###")


def test_stop_tokens_of_qwen25_union_config_and_generation_config(tmp_path):
    md = ModelDir.read(dirs.qwen25(tmp_path))
    # config.json names only <|im_end|>; generation_config.json adds <|endoftext|>.
    assert md.eos_ids() == {151645, 151643}
    assert md.end_of_turn_id(md.chat_template()) == 151645
    assert not md.add_bos and md.bos_token == ""


def test_stop_tokens_of_gemma_include_the_template_end_of_turn(tmp_path):
    md = ModelDir.read(dirs.gemma(tmp_path))
    assert md.eos_ids() == {1}
    assert md.end_of_turn_id(md.chat_template()) == 107  # <end_of_turn> is in no config file
    assert md.bos_token == "<bos>" and md.eos_token == "<eos>" and md.add_bos


def test_generation_config_is_optional(tmp_path):
    path = dirs.llama31(tmp_path)
    (path / "generation_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 128001}))
    md = ModelDir.read(path)
    assert md.eos_ids() == {128001, 128009}  # tokenizer_config's eos_token still counts


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelDir.read(tmp_path)


def test_chatml_renders_as_qwen_expects(tmp_path):
    t = ModelDir.read(dirs.qwen25(tmp_path)).chat_template()
    assert t.render(MSGS) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                              "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(MSGS[1:]).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_llama3_renders_with_bos_and_headers(tmp_path):
    t = ModelDir.read(dirs.llama31(tmp_path)).chat_template()
    assert t.render(MSGS) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gemma_template_file_wins_and_its_exceptions_are_400(tmp_path):
    t = ModelDir.read(dirs.gemma(tmp_path)).chat_template()
    assert t.render(MSGS[1:]) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(InvalidRequest, match="System role not supported"):
        t.render(MSGS)


def test_template_lookup_order(tmp_path):
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    listed = {"chat_template": [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": "default one"}]}
    assert find_chat_template(tmp_path, listed) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert find_chat_template(tmp_path, listed) == "from jinja"
    assert find_chat_template(tmp_path, listed, "tool_use") == "tools"
    (tmp_path / "mine.jinja").write_text("configured")
    assert find_chat_template(tmp_path, listed, "mine.jinja") == "configured"
    with pytest.raises(FileNotFoundError, match="nope"):
        find_chat_template(tmp_path, listed, "nope")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert find_chat_template(bare, listed) == "default one"
    assert find_chat_template(bare, {"chat_template": "plain"}) == "plain"
    assert find_chat_template(bare, {}) is None


def test_end_of_turn_is_none_for_plain_text_turns():
    t = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}")
    assert end_of_turn(t, ["<|im_end|>", "</s>"]) is None
    refusing = ChatTemplate("{{ raise_exception('no assistant turns here') }}")
    assert end_of_turn(refusing, ["</s>"]) is None


# --- result dicts -> events -------------------------------------------------------------------

def streaming(eos=False, **kw):
    return {"job": None, "stage": "streaming", "eos": eos, "serial": 0, "identifier": 1, **kw}


def ids(*t):
    return torch.tensor([list(t)])


def test_results_become_deltas_and_a_finish():
    s = ChoiceStream(2)
    assert s.feed({"job": None, "stage": "started", "eos": False, "serial": 0}) == []
    assert s.feed({"job": None, "stage": "prefill", "eos": False, "serial": 0,
                   "curr_progress": 10, "max_progress": 20}) == []
    assert s.feed(streaming(text="Hel", token_ids=ids(5))) == [Delta(2, "Hel", tokens=1)]
    assert s.feed(streaming()) == []  # held back: no text, no tokens
    assert s.feed(streaming(text="lo wo", token_ids=ids(6, 7))) == [Delta(2, "lo wo", tokens=2)]
    end = s.feed(streaming(eos=True, eos_reason="max_new_tokens", text="rld", token_ids=ids(8),
                           new_tokens=4, prompt_tokens=9, full_completion="Hello world"))
    assert end == [Delta(2, "rld", tokens=1), Finish(2, "length", 4)]


def test_a_reply_cut_inside_a_character_ends_before_it():
    # max_new_tokens came after two of an emoji's four bytes: exllamav2 releases the held
    # pieces as U+FFFDs. The text stops before them; the tokens still count.
    s = ChoiceStream(0)
    end = s.feed(streaming(eos=True, eos_reason="max_new_tokens", text="ok \ufffd\ufffd",
                           token_ids=ids(5, 6, 7), new_tokens=3))
    assert end == [Delta(0, "ok ", tokens=3), Finish(0, "length", 3)]


def test_stop_token_is_not_counted_and_brings_no_text():
    s = ChoiceStream(0, {5: "Hi", 151645: ""}.__getitem__)
    s.feed(streaming(text="Hi", token_ids=ids(5)))
    end = s.feed(streaming(eos=True, eos_reason="stop_token", eos_triggering_token_id=151645,
                           eos_triggering_token_str="<|im_end|>", new_tokens=2,
                           held={"token_ids": ids(151645)}, full_completion="Hi"))
    assert end == [Finish(0, "stop", 1)]


def test_text_held_when_a_stop_token_comes_is_still_output():
    # Stop string "\n\n": a lone "\n" was held back, then the model sampled </s> (id 2,
    # decoded as "</s>" by a SentencePiece vocabulary): "\n" is output, "</s>" is not.
    s = ChoiceStream(0, {7: "\n", 2: "</s>"}.__getitem__)
    end = s.feed(streaming(eos=True, eos_reason="stop_token", eos_triggering_token_id=2,
                           eos_triggering_token_str="</s>", new_tokens=5,
                           held={"text": "\n</s>", "token_ids": ids(7, 2)}))
    assert end == [Delta(0, "\n", tokens=1), Finish(0, "stop", 4)]


def test_stop_string_releases_the_text_before_it():
    s = ChoiceStream(0)
    end = s.feed(streaming(eos=True, eos_reason="stop_string", eos_triggering_string="\n\n",
                           text="Done.", token_ids=ids(3, 4, 9), new_tokens=3))
    assert end == [Delta(0, "Done.", tokens=3), Finish(0, "stop", 3)]
    assert ChoiceStream(1).feed(streaming(eos=True, eos_reason="end_filter", new_tokens=7)) == [
        Finish(1, "stop", 7)]


def test_cancelled_finish_counts_tokens_seen():
    s = ChoiceStream(0)
    s.feed(streaming(text="ab", token_ids=ids(1, 2)))
    assert s.cancelled() == Finish(0, "cancelled", 2)


def test_logprobs_from_probabilities_and_top_tokens():
    pieces = {1: "a", 2: "é", 3: "c"}
    s = ChoiceStream(0, pieces.__getitem__, logprobs=True)
    (delta,) = s.feed(streaming(text="aé", token_ids=ids(1, 2),
                                token_probs=torch.tensor([[0.5, 0.0]]),
                                top_k_tokens=torch.tensor([[[1, 3], [2, 1]]]),
                                top_k_probs=torch.tensor([[[0.5, 0.25], [0.0, 0.0]]])))
    first, second = delta.logprobs
    assert first["token"] == "a" and first["logprob"] == pytest.approx(math.log(0.5))
    assert [t["token"] for t in first["top_logprobs"]] == ["a", "c"]
    assert first["top_logprobs"][1]["logprob"] == pytest.approx(math.log(0.25))
    # Truncated away by the sampler: probability 0, which JSON cannot spell as -inf.
    assert second["logprob"] == FLOOR_LOGPROB and second["bytes"] == list("é".encode())
    assert ChoiceStream(0, pieces.__getitem__).feed(
        streaming(text="a", token_ids=ids(1), token_probs=torch.tensor([[0.5]])))[0].logprobs is None


def test_the_commented_registry_example_is_valid():
    import tomllib
    from pathlib import Path

    from config.settings import ModelEntry

    text = (Path(__file__).resolve().parent.parent / "config" / "ferry.toml").read_text()
    block = text[text.index("# [[models]]\n# name = \"qwen2.5"):]
    lines = [line[2:] for line in block.splitlines()
             if line.startswith("# ") and not line.startswith("# #")]
    (raw,) = tomllib.loads("\n".join(lines))["models"]
    entry = ModelEntry.model_validate(raw)
    limits = ExLlamaV2Options.model_validate(entry.options).limits(entry.num_ctx)
    assert entry.backend == "exllamav2" and limits.cache_tokens >= limits.max_seq_len
