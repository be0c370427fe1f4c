"""Pure logic below the backends: stop strings, events, templates, settings."""

from __future__ import annotations

import pytest

from config import Registry, load_settings
from config.errors import InvalidRequest, ModelNotFound
from config.contract import events
from models.stops import StopMatcher
from models.templates import ChatTemplate


def run(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush(), m.stopped


@pytest.mark.parametrize("stops,pieces,expected,stopped", [
    ([], ["a", "b"], "ab", False),
    (["STOP"], ["hello ST", "OP world"], "hello ", True),
    (["STOP"], ["hello ST", "ART"], "hello START", False),
    (["\n\n"], ["a\n", "\nb"], "a", True),
    (["ab", "b"], ["xab"], "x", True),
    (["abc"], ["a", "b"], "ab", False),
    (["end"], ["the end"], "the ", True),
])
def test_stop_matcher(stops, pieces, expected, stopped):
    assert run(stops, pieces) == (expected, stopped)


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["</s>"])
    assert m.feed("text </") == "text "
    assert m.feed("x") == "</x"


def test_events_roundtrip():
    evs = [events.Started("w", 3), events.Delta(0, "hi", 1), events.Finish(0, "stop", 1),
           events.Done(3, 1)]
    first, back = events.decode(events.encode(7, evs))
    assert first == 7 and back == evs
    f = events.Failed(400, {"message": "m", "type": "t", "param": None, "code": "c"})
    assert events.decode(events.encode(0, [f]))[1] == [f]


def test_template_renders_and_raises_as_400():
    t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert t.render([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    strict = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        strict.render([{"role": "user", "content": "hi"}])


def test_template_sandbox_blocks_attribute_escapes():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest):
        t.render([])


def test_default_registry(monkeypatch):
    monkeypatch.delenv("FERRY_CONFIG", raising=False)
    settings = load_settings()
    reg = Registry(settings.models)
    entry = reg.resolve("smollm2")
    assert entry.queue == "ferry.smollm2" and entry.owned_by == "library"
    assert entry.weights_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry.weights_path().is_file()
    with pytest.raises(ModelNotFound):
        reg.resolve("gpt-4o")


def test_env_overrides_toml(monkeypatch):
    monkeypatch.setenv("FERRY_PORT", "9001")
    monkeypatch.setenv("FERRY_WORKER_TIMEOUT", "2.5")
    s = load_settings()
    assert s.port == 9001 and s.worker_timeout == 2.5


@pytest.mark.parametrize("value", ["sk-a,sk-b", " sk-a , sk-b ,", '["sk-a", "sk-b"]',
                                   '[{"key": "sk-a", "name": "a"}, "sk-b"]'])
def test_api_keys_from_the_environment(monkeypatch, value):
    """FERRY_API_KEYS as JSON or as keys separated by commas (a plain list was a traceback)."""
    monkeypatch.setenv("FERRY_API_KEYS", value)
    assert [k.key for k in load_settings().api_keys] == ["sk-a", "sk-b"]


def test_api_keys_that_are_broken_json_say_so(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("FERRY_API_KEYS", '["sk-a",')
    with pytest.raises(ValidationError, match="not a JSON list of keys"):
        load_settings()


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="used twice"):
        load_settings(models=[{"name": "a", "backend": "synthetic", "weights": ""},
                              {"name": "b", "backend": "synthetic", "weights": "", "aliases": ["a"]}])


def test_a_chunk_must_outlive_its_lines_wait():
    """A chunk still running when its visibility timeout passes is run again elsewhere."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="batch_visibility_timeout"):
        load_settings(batch_visibility_timeout=1800, batch_line_timeout=3600)
    assert load_settings().batch_visibility_timeout > load_settings().batch_line_timeout
