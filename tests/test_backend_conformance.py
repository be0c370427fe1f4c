"""One contract, every backend: the same tests run in-process against each generation backend.

llama.cpp runs here on the CPU default (SmolLM2 from the default registry entry). ExLlamaV2
runs only on a host with CUDA and ``FERRY_TEST_EXL2_MODEL`` set to an EXL2 model directory
(``make gpu-check``); elsewhere its cases are skipped with the reason printed (-ra).
Optional: ``FERRY_TEST_EXL2_CTX`` (num_ctx, default 4096) and ``FERRY_TEST_EXL2_OPTIONS``
(the registry options as JSON).

The request surface (logprobs, echo, JSON schema, tool calls, what ``check`` refuses) runs
where the backend's capability flags say it is supported, and is skipped with the reason
where they say it is not.
"""

from __future__ import annotations

import json
import os
import threading

import jsonschema
import pytest

from config import Registry, load_settings
from config.errors import ContextLengthExceeded, InvalidRequest
from config.settings import ModelEntry
from models import load_backend
from config.contract.events import Delta, Done, Finish, Started, ToolCallDelta
from config.contract.job import FunctionTool, GenerationJob, ResponseFormat, Sampling

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def exl2_entry() -> ModelEntry:
    return ModelEntry(name="exl2-conformance", backend="exllamav2",
                      weights=os.environ["FERRY_TEST_EXL2_MODEL"],
                      num_ctx=int(os.environ.get("FERRY_TEST_EXL2_CTX", "4096")),
                      options=json.loads(os.environ.get("FERRY_TEST_EXL2_OPTIONS", "{}")))


def exl2_skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "ExLlamaV2 conformance needs a CUDA GPU; this host has none"
    if not os.environ.get("FERRY_TEST_EXL2_MODEL"):
        return "ExLlamaV2 conformance needs FERRY_TEST_EXL2_MODEL (an EXL2 model directory)"
    return None


@pytest.fixture(scope="module", params=[
    pytest.param("llama_cpp", marks=pytest.mark.model),
    pytest.param("exllamav2", marks=pytest.mark.gpu),
])
def backend(request):
    if request.param == "exllamav2":
        reason = exl2_skip_reason()
        if reason:
            pytest.skip(reason)
        entry = exl2_entry()
    else:
        entry = Registry(load_settings().models).resolve("smollm2")
    b = load_backend(entry)
    yield b
    b.close()


def run(backend, cancelled=lambda: False, **fields):
    fields.setdefault("messages", STORY)
    fields.setdefault("sampling", Sampling(temperature=0))
    job = GenerationJob(id="conformance", model=backend.entry.name, **fields)
    return list(backend.generate(job, cancelled))


def text(events, index=0) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta) and e.index == index)


def finishes(events) -> dict[int, Finish]:
    return {e.index: e for e in events if isinstance(e, Finish)}


def test_event_order_and_token_accounting(backend):
    events = run(backend, max_tokens=12)
    assert isinstance(events[0], Started) and events[0].prompt_tokens > 0
    assert isinstance(events[-1], Done) and events[-1].prompt_tokens == events[0].prompt_tokens
    (finish,) = finishes(events).values()
    assert events[-2] is finish and finish.finish_reason in ("stop", "length")
    deltas = [e for e in events if isinstance(e, Delta)]
    assert text(events) and all(d.index == 0 for d in deltas)
    assert sum(d.tokens for d in deltas) == finish.completion_tokens == events[-1].completion_tokens


def test_greedy_is_deterministic(backend):
    first, second = run(backend, max_tokens=24), run(backend, max_tokens=24)
    assert text(first) and text(first) == text(second)
    assert finishes(first) == finishes(second)


def test_max_tokens_ends_with_length(backend):
    events = run(backend, max_tokens=5)
    assert finishes(events)[0] == Finish(0, "length", 5)
    assert events[-1].completion_tokens == 5


def test_stop_string_cuts_the_text_before_it(backend):
    full = text(run(backend, max_tokens=24))
    # A stop string first occurring a few characters into the greedy output.
    k = next(i for i in range(3, len(full) - 3)
             if not full[i].isspace() and full.find(full[i:i + 3]) == i)
    stop = full[k:k + 3]
    events = run(backend, max_tokens=24, stop=[stop])
    assert text(events) == full[:k]
    assert finishes(events)[0].finish_reason == "stop"


def test_seed_reproduces_a_sampled_completion(backend):
    def sample(seed):
        return text(run(backend, max_tokens=16, sampling=Sampling(temperature=1.0, seed=seed)))

    assert sample(42) == sample(42)
    assert len({sample(42), sample(1), sample(2), sample(3)}) > 1  # the seed matters


def test_n_choices(backend):
    events = run(backend, n=3, max_tokens=8, sampling=Sampling(temperature=1.0, seed=7))
    ends = finishes(events)
    assert sorted(ends) == [0, 1, 2] and all(text(events, i) for i in range(3))
    assert events[-1].completion_tokens == sum(f.completion_tokens for f in ends.values())
    assert sum(isinstance(e, (Started, Done)) for e in events) == 2


def test_cancel_stops_within_one_step(backend):
    flag = threading.Event()
    before, after = [], []
    job = GenerationJob(id="conformance-cancel", model=backend.entry.name, messages=STORY,
                        max_tokens=200, sampling=Sampling(temperature=0))
    for ev in backend.generate(job, flag.is_set):
        (after if flag.is_set() else before).append(ev)
        if isinstance(ev, Delta) and ev.text:
            flag.set()
    assert any(isinstance(e, Delta) for e in before)
    assert sum(e.tokens for e in after if isinstance(e, Delta)) == 0  # nothing decoded after
    assert [type(e) for e in after if not isinstance(e, Delta)] == [Finish, Done]
    assert finishes(after)[0].finish_reason == "cancelled"


def test_context_length_exceeded_before_any_event(backend):
    gen = backend.generate(GenerationJob(id="conformance-ctx", model=backend.entry.name,
                                         messages=STORY, max_tokens=backend.entry.num_ctx),
                           lambda: False)
    with pytest.raises(ContextLengthExceeded) as e:
        next(gen)
    assert e.value.status == 400 and e.value.param == "messages"


# -- the request surface ---------------------------------------------------------------------

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
          "properties": {"a": {"type": "string", "maxLength": 12},
                         "b": {"type": "array", "maxItems": 3,
                               "items": {"enum": [1, 2, "three", None]}}}}
WEATHER = FunctionTool(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"]})
HELLO = [{"role": "user", "content": "Say hello"}]


def needs(backend, flag: str) -> None:
    if not getattr(backend, flag):
        pytest.skip(f"{backend.entry.name}: {flag} is False for this backend")


def checked_run(backend, **fields):
    """``run`` after ``check``, as the worker does."""
    fields.setdefault("messages", HELLO)
    fields.setdefault("sampling", Sampling(temperature=0))
    backend.check(GenerationJob(id="conformance", model=backend.entry.name, **fields))
    return run(backend, **fields)


def test_logprobs_match_the_greedy_tokens(backend):
    needs(backend, "supports_logprobs")
    events = checked_run(backend, max_tokens=8, top_logprobs=2)
    entries = [x for e in events if isinstance(e, Delta) for x in e.logprobs or ()]
    assert len(entries) == events[-1].completion_tokens
    assert "".join(x["token"] for x in entries) == text(events)
    for x in entries:
        assert isinstance(x["logprob"], float) and x["logprob"] <= 0
        assert len(x["top_logprobs"]) == 2 and x["top_logprobs"][0]["token"] == x["token"]


def test_echo_with_logprobs_covers_every_prompt_token(backend):
    needs(backend, "supports_logprobs")
    events = checked_run(backend, messages=None, prompt="The sky is blue", echo=True,
                         top_logprobs=1, max_tokens=2)
    echo = next(e for e in events if isinstance(e, Delta))
    assert echo.prompt and echo.tokens == 0 and echo.text == "The sky is blue"
    assert len(echo.logprobs) == events[0].prompt_tokens
    assert echo.logprobs[0]["logprob"] is None


def test_schema_output_validates_when_sampling_hot(backend):
    needs(backend, "supports_constraints")
    rf = ResponseFormat(type="json_schema", json_schema=SCHEMA)
    events = checked_run(backend, n=4, max_tokens=200, response_format=rf,
                         sampling=Sampling(temperature=1.5, seed=2))
    for i in range(4):
        jsonschema.validate(json.loads(text(events, i)), SCHEMA)
    assert {f.finish_reason for f in finishes(events).values()} == {"stop"}


def test_required_tool_call_validates_when_sampling_hot(backend):
    needs(backend, "supports_constraints")
    events = checked_run(backend, n=3, max_tokens=100, tools=[WEATHER], tool_choice="required",
                         messages=[{"role": "user", "content": "Weather in Oslo?"}],
                         sampling=Sampling(temperature=1.5, seed=3))
    for i in range(3):
        calls = [e for e in events if isinstance(e, ToolCallDelta) and e.index == i]
        assert calls[0].name == "get_weather" and calls[0].id
        jsonschema.validate(json.loads("".join(c.arguments for c in calls)),
                            WEATHER.parameters)
    assert {f.finish_reason for f in finishes(events).values()} == {"tool_calls"}


def test_template_with_its_own_tool_format(backend):
    """A template that writes calls between <tool_call> tags: the model is constrained to
    that format, and the call is parsed out of it."""
    from models.templates import ChatTemplate
    from tests.test_surface_units import TAGGED_TEMPLATE

    needs(backend, "supports_constraints")
    if not isinstance(getattr(backend, "template", None), ChatTemplate):
        pytest.skip(f"{backend.entry.name}: no ChatTemplate attribute to swap in this test")
    own, backend.template = backend.template, ChatTemplate(TAGGED_TEMPLATE)
    try:
        events = checked_run(backend, max_tokens=60, tools=[WEATHER], tool_choice="required",
                             messages=[{"role": "user", "content": "Weather in Oslo?"}])
    finally:
        backend.template = own
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads("".join(c.arguments for c in calls)), WEATHER.parameters)
    assert finishes(events)[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("fields,param", [
    (dict(sampling=Sampling(logit_bias={10 ** 7: 1.0})), "logit_bias"),
    (dict(messages=None, prompt="x", suffix="y"), "suffix"),
    (dict(messages=None, prompt="x", echo=True), "echo"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
     "messages[0].content"),
])
def test_check_refuses_what_the_backend_cannot_do(backend, fields, param):
    fields.setdefault("messages", HELLO)
    if param == "suffix" and backend.supports_fim:
        pytest.skip(f"{backend.entry.name} supports fill-in-the-middle")
    if param == "echo" and backend.supports_echo:
        pytest.skip(f"{backend.entry.name} echoes prompts")
    if param.startswith("messages") and backend.supports_vision:
        pytest.skip(f"{backend.entry.name} has image input")
    with pytest.raises(InvalidRequest) as e:
        backend.check(GenerationJob(id="conformance", model=backend.entry.name, **fields))
    assert e.value.param == param
