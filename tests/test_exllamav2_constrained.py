"""ExLlamaV2Backend with grammars and images, on CPU: a model directory's real files (for
grammars SmolLM2's, whose tokenizer.json the backend builds its llguidance tokenizer from),
the engine replaced by the test double, which tokenizes with that tokenizer.json and applies
Ferry's mask filters as exllamav2 0.3.2 applies filters (nothing here runs ExLlamaV2 or a
GPU)."""

from __future__ import annotations

import base64
import io
import json

import jsonschema
import pytest

from config.errors import GenerationFailed, InvalidRequest, Unsupported
from config.settings import ModelEntry
from config.contract.events import Delta, Finish, ToolCallDelta
from models.exllamav2.backend import ExLlamaV2Backend
from models.exllamav2.model_dir import ModelDir
from models.exllamav2.vision import EmbeddingCache, JobImage
from config.contract.job import FunctionTool, GenerationJob, ResponseFormat
from tests import exl2_model_dirs as dirs
from tests.exl2_doubles import EngineDouble, HFEngineDouble
from tests.test_exllamav2_backend import ENDOFTEXT, IM_END, Toy, text_of, toy_dir

pytest.importorskip("llguidance")
GGUF = dirs.smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(GGUF is None,
                                   reason="the SmolLM2 weights package is not installed")

WEATHER = FunctionTool(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if GGUF is None:
        pytest.skip("the SmolLM2 weights package is not installed")
    return dirs.smollm2(tmp_path_factory.mktemp("smollm2"), GGUF)


class Scripted:
    """A backend over SmolLM2's directory whose double "wants" to write ``reply`` (strings,
    encoded with the real tokenizer, and token ids)."""

    def __init__(self, path, reply, **entry):
        self.engine = HFEngineDouble(path, lambda job: self.reply_ids, eos_token_id=IM_END)
        self.reply_ids = [t for part in reply for t in (
            self.engine.encode(part, add_bos=False) if isinstance(part, str) else [part])]
        self.engine.encoded.clear()
        self.backend = ExLlamaV2Backend(ModelEntry(
            name="smol", backend="exllamav2", weights=str(path), num_ctx=1024,
            options={"max_batch_size": 4}, **entry), engine=self.engine)

    def run(self, **job):
        job.setdefault("messages", [{"role": "user", "content": "Hi"}])
        return list(self.backend.generate(GenerationJob(id="j", model="smol", **job),
                                          lambda: False))


@pytest.fixture
def scripted(smollm2_dir):
    made = []

    def make(*reply, **entry):
        made.append(Scripted(smollm2_dir, list(reply), **entry))
        return made[-1]

    yield make
    for toy in made:
        toy.backend.close()


def calls_of(events):
    return [e for e in events if isinstance(e, ToolCallDelta)]


# --- grammars -----------------------------------------------------------------------------------

def test_json_mode_cannot_end_inside_the_json_and_ends_at_an_end_token(scripted):
    # The "model" tries to end its turn inside a string: the mask refuses.
    toy = scripted('{"a": "x', IM_END, 'y"}', IM_END)
    events = toy.run(response_format=ResponseFormat(type="json_object"))
    assert json.loads(text_of(events)) == {"a": "xyy"}
    (job,) = toy.engine.jobs
    assert job.filters == [toy.engine.filters[0]] and job.filter_prefer_eos is False
    # SmolLM2's end ids (config, generation config, tokenizer config): <|im_end|>.
    assert job.stop_tokens == {IM_END} and toy.engine.grammars[0].end == (IM_END,)
    finish = events[-2]
    written = len(toy.reply_ids) - 2 + 1  # both end tokens refused, 'y' written twice
    assert finish == Finish(0, "stop", written)  # the final end token is not counted


def test_json_schema_output_validates(scripted):
    toy = scripted('{"n": 3, "tags": ["a", "b", "c"]}', IM_END)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1},
                                               "tags": {"type": "array", "maxItems": 2,
                                                        "items": {"type": "string"}}},
              "required": ["n", "tags"]}
    events = toy.run(response_format=ResponseFormat(type="json_schema", json_schema=schema))
    out = json.loads(text_of(events))
    jsonschema.validate(out, schema)
    assert out["n"] == 3 and out["tags"][0] == "a" and len(out["tags"]) == 2


def test_integers_without_bounds_stop_at_the_models_digit_limit(scripted):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    rf = ResponseFormat(type="json_schema", json_schema=schema)
    toy = scripted('{"n": ' + "7" * 40 + "}", IM_END)
    assert json.loads(text_of(toy.run(response_format=rf))) == {"n": int("7" * 15)}
    toy = scripted('{"n": ' + "7" * 40 + "}", IM_END, max_integer_digits=3)
    assert json.loads(text_of(toy.run(response_format=rf))) == {"n": 777}


def test_required_tool_call_streams_tool_call_deltas(scripted):
    toy = scripted(CALL, IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="required")
    calls = calls_of(events)
    assert calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads("".join(c.arguments for c in calls)) == {"city": "Oslo"}
    assert text_of(events) == ""
    finish = events[-2]
    written = len(toy.engine.encode(CALL, add_bos=False))
    assert finish.finish_reason == "tool_calls" and finish.completion_tokens == written
    assert sum(e.tokens for e in events if isinstance(e, (Delta, ToolCallDelta))) == written
    rendered = toy.engine.encoded[0][0]
    assert "You can call these tools" in rendered and "get_weather" in rendered


def test_a_call_to_another_tool_is_refused(scripted):
    toy = scripted('{"name": "get_time", "arguments": {}}', IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=30)
    assert all(c.name in (None, "get_weather") for c in calls_of(events))


def test_a_call_cut_by_max_tokens_finishes_with_length(scripted):
    toy = scripted(CALL, IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=12)
    assert events[-2] == Finish(0, "length", 12)
    calls = calls_of(events)
    assert calls[0].name == "get_weather"
    assert CALL.startswith('{"name": "get_weather", "arguments": ' +
                           "".join(c.arguments for c in calls))


def test_auto_tool_choice_text_or_call(scripted):
    toy = scripted("It is sunny.", IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER], tool_choice="auto")
    assert text_of(events) == "It is sunny." and not calls_of(events)
    assert events[-2].finish_reason == "stop"
    toy = scripted(CALL, IM_END)
    events = toy.run(messages=ASK, tools=[WEATHER])  # auto is the default with tools
    assert calls_of(events)[0].name == "get_weather" and events[-2].finish_reason == "tool_calls"


def test_every_job_gets_a_fresh_filter(scripted):
    toy = scripted('{"a": 1}', IM_END)
    toy.run(response_format=ResponseFormat(type="json_object"), n=2)
    toy.run(response_format=ResponseFormat(type="json_object"))
    filters = [f for job in toy.engine.jobs for f in job.filters]
    assert len(filters) == 3 and len({id(f) for f in filters}) == 3
    assert len({id(f.mask.matcher) for f in filters}) == 3


def test_unenforceable_schema_is_a_400_before_anything_is_queued(scripted):
    toy = scripted('{}', IM_END)
    with pytest.raises(InvalidRequest) as e:  # llguidance's refusal, as on the CPU backend
        toy.run(response_format=ResponseFormat(type="json_schema", json_schema={
            "type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}))
    assert e.value.param == "response_format" and "min/maxProperties" in e.value.message
    assert toy.engine.jobs == []


def test_a_grammar_failure_fails_its_choice_and_the_generator_carries_on(scripted):
    toy = scripted('{"a": 1}', IM_END)
    # The reply must open with "{": a grammar that lets "hello" through and then refuses it.
    toy.engine.generators[-1].forced = {0: toy.engine.encode("hello", add_bos=False)[0]}
    with pytest.raises(GenerationFailed, match="refused"):
        toy.run(response_format=ResponseFormat(type="json_object"))
    assert len(toy.engine.generators) == 1  # not rebuilt: no other job was touched
    toy.engine.generators[-1].forced = {}
    assert json.loads(text_of(toy.run(response_format=ResponseFormat(type="json_object")))) \
        == {"a": 1}


def test_unconstrained_jobs_have_no_filters(scripted):
    toy = scripted("Hi", IM_END)
    toy.run()
    (job,) = toy.engine.jobs
    assert job.filters == [] and job.filter_prefer_eos is False and job.embeddings == []


def test_a_tokenizer_llguidance_cannot_read_leaves_text_only(tmp_path, caplog):
    path = toy_dir(tmp_path)
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": []}))  # no decoder
    engine = EngineDouble(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "x"],
                          lambda job: [3, IM_END], eos_token_id=ENDOFTEXT)
    backend = ExLlamaV2Backend(ModelEntry(name="t", backend="exllamav2", weights=str(path),
                                          num_ctx=1024), engine=engine)
    try:
        assert not backend.supports_constraints and "llguidance cannot read" in caplog.text
        with pytest.raises(Unsupported) as e:
            backend.check(GenerationJob(id="a", model="t", messages=ASK,
                                        response_format=ResponseFormat(type="json_object")))
        assert e.value.param == "response_format"
        assert ExLlamaV2Backend.supports_constraints is True  # only this instance cannot
        events = list(backend.generate(GenerationJob(id="b", model="t", messages=ASK),
                                       lambda: False))
        assert text_of(events) == "x"
    finally:
        backend.close()


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
