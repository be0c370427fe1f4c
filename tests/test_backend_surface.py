"""The request surface at the backend interface: a backend in this process, fed jobs, its
events checked. Parametrised by backend, so every backend answers to the same contract
(add a backend to ``BACKENDS`` with a way to load it; it is skipped, with the reason, where
it cannot run)."""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest

from config import Registry, load_settings
from config.errors import InvalidRequest
from models import load_backend
from models.events import Delta, Done, Finish, Started, ToolCallDelta
from models.job import FunctionTool, GenerationJob, ResponseFormat, Sampling
from tests.services import TEST_CONFIG

pytestmark = pytest.mark.model

BACKENDS = ["smollm2"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
          "properties": {"a": {"type": "string", "maxLength": 12},
                         "b": {"type": "array", "maxItems": 3,
                               "items": {"enum": [1, 2, "three", None]}}}}
WEATHER = FunctionTool(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"]})


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    models = tomllib.loads(TEST_CONFIG.read_text())["models"]
    b = load_backend(Registry(load_settings(models=models).models).resolve(request.param))
    yield b
    b.close()


def run(backend, cancel_after: int | None = None, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "Say hello"}])
    job = GenerationJob(id="t", model=backend.entry.name, **kw)
    backend.check(job)
    seen = []

    def cancelled():
        return cancel_after is not None and sum(isinstance(e, Delta) for e in seen) >= cancel_after

    for ev in backend.generate(job, cancelled):
        seen.append(ev)
    return seen


def texts(evs):
    out: dict[int, str] = {}
    for e in evs:
        if isinstance(e, Delta):
            out[e.index] = out.get(e.index, "") + e.text
    return out


def test_event_order_and_counts(backend):
    evs = run(backend, n=2, max_tokens=6, sampling=Sampling(temperature=1.0, seed=1))
    assert isinstance(evs[0], Started) and isinstance(evs[-1], Done)
    finishes = [e for e in evs if isinstance(e, Finish)]
    assert [f.index for f in finishes] == [0, 1]
    for f in finishes:
        assert f.completion_tokens == sum(e.tokens for e in evs
                                          if isinstance(e, Delta) and e.index == f.index)
    assert evs[-1].completion_tokens == sum(f.completion_tokens for f in finishes)


def test_greedy_is_deterministic_and_logprobs_match(backend):
    kw = dict(max_tokens=8, sampling=Sampling(temperature=0), top_logprobs=2)
    a, b = run(backend, **kw), run(backend, **kw)
    assert texts(a) == texts(b)
    entries = [x for e in a if isinstance(e, Delta) for x in e.logprobs or ()]
    assert len(entries) == a[-1].completion_tokens
    assert "".join(x["token"] for x in entries) == texts(a)[0]
    assert all(x["top_logprobs"][0]["token"] == x["token"] for x in entries)


def test_echo_logprobs_cover_every_prompt_token(backend):
    evs = run(backend, messages=None, prompt="The sky is blue", echo=True, top_logprobs=1,
              max_tokens=2, sampling=Sampling(temperature=0))
    echo = next(e for e in evs if isinstance(e, Delta))
    assert echo.prompt and echo.tokens == 0 and echo.text == "The sky is blue"
    assert len(echo.logprobs) == evs[0].prompt_tokens
    assert echo.logprobs[0]["logprob"] is None


def test_schema_output_validates_when_sampling_hot(backend):
    rf = ResponseFormat(type="json_schema", json_schema=SCHEMA)
    evs = run(backend, n=4, max_tokens=200, response_format=rf,
              sampling=Sampling(temperature=1.5, seed=2))
    for i, text in texts(evs).items():
        jsonschema.validate(json.loads(text), SCHEMA)
    assert {e.finish_reason for e in evs if isinstance(e, Finish)} == {"stop"}


def test_required_tool_call_validates_when_sampling_hot(backend):
    evs = run(backend, n=3, max_tokens=100, tools=[WEATHER], tool_choice="required",
              messages=[{"role": "user", "content": "Weather in Oslo?"}],
              sampling=Sampling(temperature=1.5, seed=3))
    for i in range(3):
        calls = [e for e in evs if isinstance(e, ToolCallDelta) and e.index == i]
        assert calls[0].name == "get_weather" and calls[0].id
        jsonschema.validate(json.loads("".join(c.arguments for c in calls)),
                            WEATHER.parameters)
    assert {e.finish_reason for e in evs if isinstance(e, Finish)} == {"tool_calls"}


def test_cancel_stops_within_a_step(backend):
    evs = run(backend, cancel_after=3, max_tokens=50, n=2, sampling=Sampling(temperature=0))
    finishes = [e for e in evs if isinstance(e, Finish)]
    assert [f.finish_reason for f in finishes] == ["cancelled", "cancelled"]
    assert finishes[0].completion_tokens <= 4


def test_stop_strings_cut_and_hold_back(backend):
    free = texts(run(backend, messages=None, prompt="1, 2, 3, 4,", max_tokens=12,
                     sampling=Sampling(temperature=0)))[0]
    cut = run(backend, messages=None, prompt="1, 2, 3, 4,", max_tokens=12, stop=[" 7"],
              sampling=Sampling(temperature=0))
    assert texts(cut)[0] == free[:free.index(" 7")]
    assert cut[-2].finish_reason == "stop"


@pytest.mark.parametrize("kw,param", [
    (dict(sampling=Sampling(logit_bias={10 ** 7: 1.0})), "logit_bias"),
    (dict(messages=None, prompt="x", suffix="y"), "suffix"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
     "messages[0].content"),
])
def test_check_refuses_what_the_backend_cannot_do(backend, kw, param):
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    job = GenerationJob(id="t", model=backend.entry.name, **kw)
    if param == "suffix" and backend.supports_fim:
        pytest.skip(f"{backend.entry.name} supports fill-in-the-middle")
    with pytest.raises(InvalidRequest) as e:
        backend.check(job)
    assert e.value.param == param


def test_template_with_its_own_tool_format(backend):
    """A template that writes calls between <tool_call> tags: the model is constrained to
    that format, and the call is parsed out of it."""
    from models.templates import ChatTemplate
    from tests.test_surface_units import TAGGED_TEMPLATE

    if not hasattr(backend, "template"):
        pytest.skip(f"{backend.entry.name}: its template cannot be swapped in this test")
    own, backend.template = backend.template, ChatTemplate(TAGGED_TEMPLATE)
    try:
        evs = run(backend, max_tokens=60, tools=[WEATHER], tool_choice="required",
                  messages=[{"role": "user", "content": "Weather in Oslo?"}],
                  sampling=Sampling(temperature=0))
    finally:
        backend.template = own
    calls = [e for e in evs if isinstance(e, ToolCallDelta)]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads("".join(c.arguments for c in calls)), WEATHER.parameters)
    assert evs[-2].finish_reason == "tool_calls"
