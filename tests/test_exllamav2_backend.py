"""ExLlamaV2Backend.generate on CPU: a real model directory's files (ChatML template, stop
tokens) with the engine replaced by a test double (nothing here runs ExLlamaV2)."""

from __future__ import annotations

import json
import threading

import pytest

from config.errors import ContextLengthExceeded, GenerationFailed, InvalidRequest
from config.settings import ModelEntry
from config.contract.events import Delta, Done, Finish, Started
from models.exllamav2.backend import ExLlamaV2Backend
from config.contract.job import GenerationJob, Sampling
from tests import exl2_model_dirs as dirs
from tests.exl2_doubles import EngineDouble

ENDOFTEXT, IM_START, IM_END = 0, 1, 2
REPLY = "Hello there."


def toy_dir(path):
    """Qwen-shaped files with small ids, so the double's vocabulary can hold them."""
    dirs.qwen25(path)
    (path / "config.json").write_text(json.dumps({"eos_token_id": IM_END, "vocab_size": 64}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]}))
    (path / "tokenizer.json").write_text(json.dumps(dirs._added(
        {ENDOFTEXT: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"})))
    return path


class Toy:
    """A backend over the toy directory; ``script`` picks what each job "samples"."""

    def __init__(self, tmp_path, script=None, num_ctx=1024, step=0.0, **options):
        self.engine = EngineDouble(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                   script or self.reply, eos_token_id=ENDOFTEXT, step=step)
        self.reply_ids = self.engine.encode(REPLY, add_bos=False) + [IM_END]
        self.engine.encoded.clear()
        entry = ModelEntry(name="toy", backend="exllamav2", weights=str(toy_dir(tmp_path)),
                           num_ctx=num_ctx, options={"max_batch_size": 4, **options})
        self.backend = ExLlamaV2Backend(entry, engine=self.engine)

    def reply(self, job):
        return self.reply_ids

    def run(self, cancelled=lambda: False, **job):
        job.setdefault("messages", [{"role": "user", "content": "Hi"}])
        return list(self.backend.generate(GenerationJob(id="j", model="toy", **job), cancelled))

    @property
    def gen(self):
        return self.engine.generators[-1]


@pytest.fixture
def toys(tmp_path):
    made = []

    def make(**kw):
        made.append(Toy(tmp_path / f"m{len(made)}", **kw))
        return made[-1]

    yield make
    for toy in made:
        toy.backend.close()


def text_of(events, index=0):
    return "".join(e.text for e in events if isinstance(e, Delta) and e.index == index)


def test_chat_renders_template_stops_at_end_of_turn_and_reports_usage(toys):
    toy = toys()
    events = toy.run()
    rendered, add_bos = toy.engine.encoded[0]
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert add_bos is False  # Qwen has no BOS
    assert isinstance(events[0], Started) and events[0].prompt_tokens == len(rendered)
    assert text_of(events) == REPLY
    assert events[-2:] == [Finish(0, "stop", len(REPLY)), Done(len(rendered), len(REPLY))]
    (job,) = toy.engine.jobs
    assert job.stop_tokens == {ENDOFTEXT, IM_END} and job.stop_strings == set()
    assert job.max_new_tokens == 1024 - len(rendered)  # no max_tokens: the rest of the context
    assert toy.engine.warmed


def test_count_prompt_is_the_prompt_generate_reports(toys):
    toy = toys()
    # The toy vocabulary is too small for a tool grammar: tool_choice "none" renders the
    # tools into the prompt all the same.
    for job in ({}, {"tools": [{"name": "f", "parameters": {"type": "object"}}],
                     "tool_choice": "none"},
                {"messages": [{"role": "system", "content": "Be terse."},
                              {"role": "user", "content": "Hi"}]}):
        counted = toy.backend.count_prompt(GenerationJob(id="c", model="toy", count_only=True,
                                                         **{"messages": [{"role": "user",
                                                                          "content": "Hi"}],
                                                            **job}))
        assert counted == toy.run(**job)[0].prompt_tokens


def test_stop_strings_and_sampling_reach_the_job(toys):
    toy = toys()
    events = toy.run(stop=["there"], sampling=Sampling(temperature=0.5, top_p=0.9, seed=11,
                                                       frequency_penalty=1.0, logit_bias={5: 3}))
    assert text_of(events) == "Hello " and events[-2].finish_reason == "stop"
    (job,) = toy.engine.jobs
    assert job.stop_strings == {"there"} and job.seed == 11
    s = job.gen_settings
    assert (s.temperature, s.top_p, s.top_k, s.token_frequency_penalty) == (0.5, 0.9, 0, 1.0)
    assert s.token_bias.shape[0] % 32 == 0 and s.token_bias[5] == 3


def test_max_tokens_finishes_with_length(toys):
    events = toys().run(max_tokens=3)
    assert text_of(events) == "Hel" and events[-2:] == [Finish(0, "length", 3), Done(
        events[0].prompt_tokens, 3)]


def test_n_choices_are_n_jobs_with_consecutive_seeds(toys):
    toy = toys()
    events = toy.run(n=3, sampling=Sampling(seed=100))
    assert sorted(j.seed for j in toy.engine.jobs) == [100, 101, 102]
    finishes = [e for e in events if isinstance(e, Finish)]
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    assert all(text_of(events, i) == REPLY for i in range(3))
    assert events[-1] == Done(events[0].prompt_tokens, 3 * len(REPLY))
    # The three were decoded together.
    assert any(len(step) == 3 for step in toy.gen.decode_steps)


def test_direct_hands_each_delta_over_on_the_loop_thread(toys):
    """``direct`` (the runtime's): the deltas go to it on the loop's thread as they are made;
    the generator yields the rest, the choices' finishes among them."""
    toy, handed = toys(), []
    events = list(toy.backend.generate(
        GenerationJob(id="d", model="toy", n=2, messages=[{"role": "user", "content": "Hi"}]),
        lambda: False, direct=lambda ev: handed.append((ev, threading.current_thread().name))))
    assert not any(isinstance(e, Delta) for e in events)
    assert sorted(e.index for e in events if isinstance(e, Finish)) == [0, 1]
    assert events[-1] == Done(events[0].prompt_tokens, 2 * len(REPLY))
    assert [text_of([ev for ev, _ in handed], i) for i in (0, 1)] == [REPLY, REPLY]
    assert {name for _, name in handed} == {toy.backend.loop.thread_name}


def test_cancel_stops_within_one_step_and_finishes_cancelled(toys):
    toy = toys(script=lambda job: [4] * 10_000, step=0.005)
    flag = threading.Event()
    events, after_flag = [], []
    for ev in toy.backend.generate(GenerationJob(id="c", model="toy", prompt="x"), flag.is_set):
        (after_flag if flag.is_set() else events).append(ev)
        if isinstance(ev, Delta):
            flag.set()
    assert [type(e) for e in after_flag] == [Finish, Done]
    assert after_flag[0].finish_reason == "cancelled"
    assert toy.engine.jobs[0] in toy.gen.cancelled


def test_context_length_is_checked_before_anything_is_queued(toys):
    toy = toys(num_ctx=256)
    with pytest.raises(ContextLengthExceeded) as e:
        toy.run(max_tokens=256)
    assert e.value.param == "messages" and "maximum context length is 256" in e.value.message
    with pytest.raises(ContextLengthExceeded) as e:
        toy.run(messages=None, prompt="x" * 300)
    assert e.value.param == "prompt"
    assert toy.engine.jobs == []


def test_logprobs_only_when_asked(toys):
    toy = toys()
    plain = toy.run()
    assert all(e.logprobs is None for e in plain if isinstance(e, Delta))
    events = toy.run(top_logprobs=2)
    deltas = [e for e in events if isinstance(e, Delta)]
    assert sum(len(d.logprobs) for d in deltas) == len(REPLY)
    assert deltas[0].logprobs[0]["token"] == "H" and len(deltas[0].logprobs[0]["top_logprobs"]) == 2
    assert [(j.return_top_tokens, j.return_probs) for j in toy.engine.jobs] == [(0, False), (2, True)]


def test_generator_failure_fails_the_request(toys):
    toy = toys(script=lambda job: [4] * 10_000, step=0.002)
    toy.gen.fail_on_iterate = 3
    with pytest.raises(GenerationFailed):
        toy.run()
    assert len(toy.engine.generators) == 2  # rebuilt
    assert text_of(toy.run(max_tokens=2)) == "ee"  # the rebuilt generator serves requests


def test_consumer_going_away_cancels_its_jobs(toys):
    toy = toys(script=lambda job: [4] * 10_000, step=0.002)
    gen = toy.backend.generate(GenerationJob(id="g", model="toy", prompt="x", n=2), lambda: False)
    while not isinstance(next(gen), Delta):
        pass
    gen.close()
    for _ in range(200):
        if len(toy.gen.cancelled) == 2:
            break
        threading.Event().wait(0.01)
    assert sorted(j.seed for j in toy.gen.cancelled) == sorted(j.seed for j in toy.engine.jobs)


def test_prompt_forms(toys, tmp_path):
    toy = toys()
    toy.run(messages=None, prompt=[7, 8, 9], max_tokens=1)
    assert toy.engine.jobs[-1].input_ids.tolist() == [[7, 8, 9]]
    with pytest.raises(InvalidRequest) as e:
        toy.run(messages=None, prompt=[7, 10_000])
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest):
        toy.run(messages=None, prompt="")


def test_bos_is_added_once(tmp_path):
    engine = EngineDouble(["<|begin_of_text|>"], lambda job: [0], bos_token_id=0)
    entry = ModelEntry(name="l3", backend="exllamav2", weights=str(dirs.llama31(tmp_path)),
                       num_ctx=2048, options={})
    backend = ExLlamaV2Backend(entry, engine=engine)
    try:
        chat = backend.prompt_ids(GenerationJob(id="a", model="l3", messages=[
            {"role": "user", "content": "Hi"}]))
        assert engine.encoded[-1][1] is False  # the template wrote <|begin_of_text|> itself
        assert chat[0] != 0
        assert backend.prompt_ids(GenerationJob(id="b", model="l3", prompt="Hi"))[0] == 0
    finally:
        backend.close()


def test_model_without_template_refuses_chat(tmp_path):
    path = toy_dir(tmp_path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    engine = EngineDouble(["x"], lambda job: [0])
    backend = ExLlamaV2Backend(ModelEntry(name="t", backend="exllamav2", weights=str(path),
                                          num_ctx=1024), engine=engine)
    try:
        with pytest.raises(InvalidRequest, match="no chat template") as e:
            list(backend.generate(GenerationJob(id="a", model="t", messages=[
                {"role": "user", "content": "Hi"}]), lambda: False))
        assert e.value.param == "messages"
    finally:
        backend.close()


def test_worker_pool_is_threads_sized_from_the_batch():
    entry = ModelEntry(name="g", backend="exllamav2", weights="/m", options={"max_batch_size": 8})
    pool, threads = ExLlamaV2Backend.worker_pool(entry)
    assert pool == "threads" and threads >= 8


def test_text_held_for_a_possible_stop_string_survives_the_end_of_turn(toys):
    # "e." could start the stop string "e.x"; then <|im_end|> ends the turn.
    events = toys().run(stop=["e.x"])
    assert text_of(events) == REPLY
    deltas = [e for e in events if isinstance(e, Delta)]
    assert sum(d.tokens for d in deltas) == events[-2].completion_tokens == len(REPLY)


def test_a_later_job_reports_the_prompt_pages_the_generator_kept_as_cached_tokens(toys):
    toy = toys(num_ctx=2048)
    notes = "The tide turns twice a day. " * 30  # ~840 tokens of the character tokenizer
    first = toy.run(messages=[{"role": "user", "content": notes}], max_tokens=4)
    again = toy.run(messages=[{"role": "user", "content": notes + "Why?"}], max_tokens=4)
    assert first[-1].cached_tokens == 0
    # One generator across jobs: the second starts on the first's whole shared pages.
    assert len(toy.engine.generators) == 1
    shared = first[0].prompt_tokens - len("<|im_end|>\n<|im_start|>assistant\n")
    assert again[-1] == Done(again[0].prompt_tokens, 4, cached_tokens=shared // 256 * 256)
    assert again[-1].cached_tokens >= 512


def test_n_choices_report_the_cache_of_the_choice_that_found_least(toys):
    toy = toys(num_ctx=2048)
    events = toy.run(n=2, messages=[{"role": "user", "content": "Tell me. " * 80}],
                     max_tokens=2)
    # The second job reused the first's pages, the first found none: the request had none.
    assert sorted(j.cached_tokens for j in toy.engine.jobs)[0] == 0
    assert max(j.cached_tokens for j in toy.engine.jobs) > 0
    assert events[-1].cached_tokens == 0
