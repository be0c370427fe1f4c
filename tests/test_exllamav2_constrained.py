"""ExLlamaV2Backend with grammars and images, on CPU: the model directory's real files, the
engine replaced by the test double, formatron's real grammars applied by the generator
double as exllamav2 0.3.2 applies filters (nothing here runs ExLlamaV2 or a GPU)."""

from __future__ import annotations

import base64
import io
import json

import pytest

from config.errors import InvalidRequest
from config.settings import ModelEntry
from config.contract.events import Delta, Finish, ToolCallDelta
from models.exllamav2.backend import ExLlamaV2Backend
from models.exllamav2.model_dir import ModelDir
from models.exllamav2.vision import EmbeddingCache, JobImage
from config.contract.job import FunctionTool, GenerationJob, ResponseFormat
from tests.exl2_doubles import EngineDouble
from tests.test_exllamav2_backend import ENDOFTEXT, IM_END, Toy, text_of, toy_dir

pytest.importorskip("formatron", reason="formatron is not installed (test extra)")

ASCII = "".join(map(chr, range(32, 127))) + "\n"
WEATHER = FunctionTool(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


class Scripted(Toy):
    """A toy whose double "wants" to write ``reply`` (a list of strings and token ids)."""

    def __init__(self, tmp_path, reply, **kw):
        super().__init__(tmp_path, **kw)
        self.engine.encode(ASCII, add_bos=False)  # every character in the vocabulary first
        self.reply_ids = [t for part in reply for t in (
            self.engine.encode(part, add_bos=False) if isinstance(part, str) else [part])]
        self.engine.encoded.clear()


@pytest.fixture
def scripted(tmp_path):
    made = []

    def make(*reply, **kw):
        made.append(Scripted(tmp_path / f"m{len(made)}", list(reply), **kw))
        return made[-1]

    yield make
    for toy in made:
        toy.backend.close()


def calls_of(events):
    return [e for e in events if isinstance(e, ToolCallDelta)]


# --- grammars -----------------------------------------------------------------------------------

def test_json_mode_cannot_end_inside_the_json_and_ends_at_the_tokenizers_eos(scripted):
    # The "model" tries to end its turn inside a string: the grammar filter refuses.
    toy = scripted('{"a": "x', IM_END, 'y"}', IM_END)
    events = toy.run(response_format=ResponseFormat(type="json_object"))
    assert json.loads(text_of(events)) == {"a": "xyy"}
    (job,) = toy.engine.jobs
    assert job.filters == [toy.engine.filters[0]] and job.filter_prefer_eos is True
    assert ENDOFTEXT == toy.engine.eos_token_id and ENDOFTEXT in job.stop_tokens
    grammar, stops = toy.engine.grammars[0]
    assert grammar.param == "response_format" and set(stops) == {ENDOFTEXT, IM_END}
    finish = events[-2]
    assert finish == Finish(0, "stop", len('{"a": "xyy"}'))  # the forced EOS is not counted


def test_json_schema_output_validates(scripted):
    toy = scripted('{"n": 3, "tags": ["a", "b", "c"]}', IM_END)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {
        "type": "array", "items": {"type": "string"}, "maxItems": 2}}}
    events = toy.run(response_format=ResponseFormat(type="json_schema", json_schema=schema))
    out = json.loads(text_of(events))
    assert out["n"] == 3 and len(out["tags"]) <= 2


def test_required_tool_call_streams_tool_call_deltas(scripted):
    toy = scripted(CALL, IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="required")
    calls = calls_of(events)
    assert calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "Oslo"}
    assert text_of(events) == ""
    finish = events[-2]
    assert finish.finish_reason == "tool_calls" and finish.completion_tokens == len(CALL)
    assert sum(e.tokens for e in events if isinstance(e, (Delta, ToolCallDelta))) == len(CALL)
    rendered = toy.engine.encoded[0][0]
    assert "You can call these tools" in rendered and "get_weather" in rendered


def test_a_call_cut_by_max_tokens_finishes_with_length(scripted):
    toy = scripted(CALL, IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=40)
    assert events[-2] == Finish(0, "length", 40)
    calls = calls_of(events)
    assert calls[0].name == "get_weather" and "".join(c.arguments for c in calls) == '{"c'


def test_auto_tool_choice_text_or_call(scripted):
    toy = scripted("It is sunny.", IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="auto")
    assert text_of(events) == "It is sunny." and not calls_of(events)
    assert events[-2].finish_reason == "stop" and toy.engine.filters[0].mode == "text"
    toy = scripted(CALL, IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER])  # auto is the default with tools
    assert calls_of(events)[0].name == "get_weather" and events[-2].finish_reason == "tool_calls"
    assert toy.engine.filters[0].mode == "call"


def test_every_job_gets_a_fresh_filter(scripted):
    toy = scripted('{"a": 1}', IM_END)
    toy.run(response_format=ResponseFormat(type="json_object"), n=2)
    toy.run(response_format=ResponseFormat(type="json_object"))
    filters = [f for job in toy.engine.jobs for f in job.filters]
    assert len(filters) == 3 and len({id(f) for f in filters}) == 3
    assert len({id(f.inner._formatter) for f in filters}) == 3


def test_unenforceable_schema_is_a_400_before_anything_is_queued(scripted):
    toy = scripted('{}', IM_END)
    with pytest.raises(InvalidRequest) as e:
        toy.run(response_format=ResponseFormat(type="json_schema", json_schema={
            "type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}))
    assert e.value.param == "response_format" and toy.engine.jobs == []


def test_unconstrained_jobs_have_no_filters(scripted):
    toy = scripted("Hi", IM_END)
    toy.run()
    (job,) = toy.engine.jobs
    assert job.filters == [] and job.filter_prefer_eos is False and job.embeddings == []


# --- vision ------------------------------------------------------------------------------------

def png(size=(2, 2), color=(255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def vision_dir(path, arch="Qwen2VLForConditionalGeneration", vision_type="qwen2_vl",
               preprocessor=True):
    toy_dir(path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=[arch], vision_config={"model_type": vision_type})
    (path / "config.json").write_text(json.dumps(config))
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    return path


class Vision(Toy):
    def __init__(self, tmp_path, **options):
        vision_dir(tmp_path)
        self.engine = EngineDouble(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                   lambda job: [IM_END], eos_token_id=ENDOFTEXT)
        entry = ModelEntry(name="vl", backend="exllamav2", weights=str(tmp_path), num_ctx=1024,
                           vision=True, options={"max_batch_size": 4, **options})
        self.backend = ExLlamaV2Backend(entry, engine=self.engine)


def image_message(*parts):
    return [{"role": "user", "content": [
        {"type": "image", "image": p} if isinstance(p, int) else {"type": "text", "text": p}
        for p in parts]}]


def test_images_become_embeddings_on_the_loop_thread_with_aliases_in_the_prompt(tmp_path):
    toy = Vision(tmp_path)
    try:
        assert toy.backend.supports_vision
        b64 = base64.b64encode(png()).decode()
        toy.run(messages=image_message("What is ", 0, "?"), images=[b64])
        (image, thread), = toy.engine.embedded
        assert thread == "exl2-loop" and image.size == (2, 2) and image.mode == "RGB"
        emb = toy.engine.jobs[0].embeddings[0]
        text, _ = toy.engine.encoded[0]
        assert f"<|im_start|>user\nWhat is {emb.text_alias}?<|im_end|>" in text
        assert toy.engine.encoded_embeddings[0] == [emb]
        ids = toy.engine.jobs[0].input_ids[0].tolist()
        assert emb.get_ids() == [i for i in ids if i >= 10 ** 9]
        # The same image again: the same embedding (ids), so the prompt's prefix repeats.
        toy.run(messages=image_message("What is ", 0, "?"), images=[b64])
        assert len(toy.engine.embedded) == 1
        assert toy.engine.jobs[1].embeddings == [emb]
        assert toy.engine.jobs[1].input_ids.tolist() == toy.engine.jobs[0].input_ids.tolist()
        # Another image (twice in one message: one embedding, used twice).
        other = base64.b64encode(png(color=(0, 0, 255))).decode()
        toy.run(messages=image_message(0, " and ", 1, " and ", 0), images=[b64, other])
        assert len(toy.engine.embedded) == 2
        embs = toy.engine.jobs[2].embeddings
        assert embs[0] is emb and embs[2] is emb and embs[1] is not emb
        assert toy.backend.embeddings.hits == 3 and toy.backend.embeddings.misses == 2
    finally:
        toy.backend.close()


def test_bad_images_are_400s_naming_the_part(tmp_path):
    toy = Vision(tmp_path)
    try:
        for data in (base64.b64encode(b"not an image").decode(), "@@@",
                     base64.b64encode(png(size=(16385, 1))).decode()):
            with pytest.raises(InvalidRequest) as e:
                toy.run(messages=image_message("x", 0), images=[data])
            assert e.value.param == "messages[0].content[1]"
        with pytest.raises(InvalidRequest, match="not resolved") as e:
            toy.run(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
        assert toy.engine.jobs == [] and toy.engine.embedded == []
    finally:
        toy.backend.close()


def test_embedding_cache_is_least_recently_used():
    made = []
    cache = EmbeddingCache(lambda image: made.append(image) or f"emb-{image}", size=2)
    a, b, c = (JobImage(d, d, "p") for d in "abc")
    assert cache.embeddings([a, b, a]) == ["emb-a", "emb-b", "emb-a"]
    cache.get(c)  # evicts b, the least recently used
    assert cache.get(a) == "emb-a" and made == ["a", "b", "c"]
    cache.get(b)
    assert made == ["a", "b", "c", "b"]


def test_vision_needs_a_vision_model_and_the_registry_flag(tmp_path):
    engine = EngineDouble(["x"], lambda job: [0])
    text_only = ModelEntry(name="t", backend="exllamav2", weights=str(toy_dir(tmp_path / "t")),
                           num_ctx=1024, vision=True)
    with pytest.raises(ValueError, match="not a vision model"):
        ExLlamaV2Backend(text_only, engine=engine)
    vl = str(vision_dir(tmp_path / "v"))
    with pytest.raises(ValueError, match="draft"):
        ExLlamaV2Backend(ModelEntry(name="v", backend="exllamav2", weights=vl, num_ctx=1024,
                                    vision=True, options={"draft": {"weights": "/d"}}),
                         engine=engine)
    # A vision model the registry does not mark takes text only (the web refuses images).
    backend = ExLlamaV2Backend(ModelEntry(name="v", backend="exllamav2", weights=vl,
                                          num_ctx=1024), engine=engine)
    try:
        assert not backend.supports_vision
        with pytest.raises(InvalidRequest) as e:
            backend.check(GenerationJob(id="a", model="v", messages=image_message("x", 0),
                                        images=["AA=="]))
        assert e.value.param == "messages[0].content"
    finally:
        backend.close()


@pytest.mark.parametrize("arch,vision_type,preprocessor,found", [
    ("Qwen2VLForConditionalGeneration", "qwen2_vl", True, True),
    ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", True, True),
    ("Gemma3ForConditionalGeneration", "siglip_vision_model", True, True),
    ("Mistral3ForConditionalGeneration", "pixtral", True, True),
    ("LlavaForConditionalGeneration", "pixtral", True, True),
    ("LlavaForConditionalGeneration", "clip_vision_model", True, False),
    ("Qwen2VLForConditionalGeneration", "qwen2_vl", False, False),
    ("Qwen2ForCausalLM", "qwen2_vl", True, False),
])
def test_vision_architectures(tmp_path, arch, vision_type, preprocessor, found):
    files = ModelDir.read(vision_dir(tmp_path, arch, vision_type, preprocessor))
    assert (files.vision_architecture() == arch) is found
