"""The Messages dialect with no services: Ferry's errors in Anthropic's shape (every status),
core events in, Messages stream events and objects out (``tasks/core/message_events.py``),
the translation onto chat messages, ``anthropic-beta``, and the stop string a choice ended on."""

from __future__ import annotations

import pytest

from config.contract import events
from config.contract.job import GenerationJob
from config.errors import (AuthenticationFailed, FerryError, GenerationFailed, InvalidRequest,
                           JobExpired, ModelNotFound, PayloadTooLarge, RateLimited,
                           ServiceUnavailable, Unsupported)
from config.settings import ModelEntry
from models.base import completion_budget, context_exceeded
from models.output import ChoiceWriter
from models.templates import ChatTemplate
from models.stops import StopMatcher
from tasks.core.message_events import MessageBuilder, error_body, error_status
from tasks.core.messages import chat_messages, chat_request
from tasks.core.schemas.messages import CreateMessageRequest, check_betas
from tasks.core.validation import validate


class Forbidden(FerryError):
    status = 403


@pytest.mark.parametrize("err,status,kind", [
    (InvalidRequest("bad"), 400, "invalid_request_error"),
    (Unsupported("no"), 400, "invalid_request_error"),
    (AuthenticationFailed("who"), 401, "authentication_error"),
    (Forbidden("not yours"), 403, "permission_error"),
    (ModelNotFound("m"), 404, "not_found_error"),
    (JobExpired("late"), 408, "invalid_request_error"),
    (PayloadTooLarge("big"), 413, "request_too_large"),
    (RateLimited("slow down"), 429, "rate_limit_error"),
    (GenerationFailed("boom"), 500, "api_error"),
    (ServiceUnavailable("no worker"), 529, "overloaded_error"),
])
def test_every_error_in_anthropics_shape(err, status, kind):
    assert error_status(err) == status
    assert error_body(err, "req_1") == {"type": "error", "request_id": "req_1",
                                        "error": {"type": kind, "message": err.message}}


def run(builder: MessageBuilder, evs) -> list[dict]:
    out = []
    for ev in evs:
        out += builder.feed(ev)
    return out


def test_text_then_tool_call_blocks():
    b = MessageBuilder("msg_1", "m")
    out = run(b, [events.Started("w", 10), events.Delta(0, "Let me see."),
                  events.ToolCallDelta(0, 0, id="call_1", name="f"),
                  events.ToolCallDelta(0, 0, arguments='{"a": '),
                  events.ToolCallDelta(0, 0, arguments="1}"),
                  events.Finish(0, "tool_calls", 7), events.Done(10, 7, cached_tokens=4)])
    assert [e["type"] for e in out] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert out[0]["message"]["usage"]["input_tokens"] == 10
    assert [e["index"] for e in out if "index" in e] == [0, 0, 0, 1, 1, 1, 1]
    assert out[6]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": '}
    msg = b.message()
    assert msg["content"][0] == {"type": "text", "text": "Let me see."}
    call = msg["content"][1]
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert call["name"] == "f" and call["input"] == {"a": 1}
    assert msg["stop_reason"] == "tool_use"
    # Anthropic counts the cached prefix apart from input_tokens.
    assert msg["usage"] == {"input_tokens": 6, "output_tokens": 7,
                            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}
    assert out[-2]["usage"] == msg["usage"]


@pytest.mark.parametrize("finish,reason,sequence", [
    (events.Finish(0, "stop", 1), "end_turn", None),
    (events.Finish(0, "length", 1), "max_tokens", None),
    (events.Finish(0, "stop", 1, stop_sequence="##"), "stop_sequence", "##"),
])
def test_stop_reasons(finish, reason, sequence):
    b = MessageBuilder("msg_1", "m")
    run(b, [events.Started("w", 1), events.Delta(0, "x"), finish, events.Done(1, 1)])
    assert (b.message()["stop_reason"], b.message()["stop_sequence"]) == (reason, sequence)


def test_a_cut_off_tool_input_is_an_empty_object():
    b = MessageBuilder("msg_1", "m")
    run(b, [events.Started("w", 1), events.ToolCallDelta(0, 0, id="c", name="f"),
            events.ToolCallDelta(0, 0, arguments='{"a": "unfinish'),
            events.Finish(0, "length", 5), events.Done(1, 5)])
    assert b.message()["content"][0]["input"] == {}
    assert b.message()["stop_reason"] == "max_tokens"


def test_the_matched_stop_string_is_reported():
    m = StopMatcher(["END", "##"])
    assert m.feed("ab#") == "ab" and m.feed("#c") == "" and m.matched == "##"
    w = ChoiceWriter(0, ["END"])
    w.add(b"xEND")
    assert w.finish("stop")[-1] == events.Finish(0, "stop", 1, stop_sequence="END")
    assert ChoiceWriter(0, ["END"]).finish("stop")[-1].stop_sequence is None


def request(**fields) -> CreateMessageRequest:
    return validate(CreateMessageRequest, {"model": "m", "max_tokens": 5, **fields})


def test_turns_as_chat_messages():
    req = request(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                  messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "down"}]},
            {"type": "text", "text": "And now?"}]}])
    assert chat_messages(req) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: down"},
        {"role": "user", "content": "And now?"}]
    chat = chat_request(req)
    assert chat.messages[0].role == "system" and chat.messages[0].content == "A\nB"


def test_sampling_tools_and_choices_map_onto_the_chat_request():
    tool = {"name": "w", "input_schema": {"type": "object"}, "cache_control": {"type": "x"}}
    for choice, chat_choice in (({"type": "any"}, "required"), ({"type": "none"}, "none"),
                                ({"type": "auto"}, "auto"), (None, "auto")):
        chat = chat_request(request(messages=[{"role": "user", "content": "hi"}], tools=[tool],
                                    tool_choice=choice, stop_sequences=["x"],
                                    temperature=0.2, metadata={"user_id": "u"}))
        assert chat.tool_choice == chat_choice
        assert chat.stops == ["x"] and chat.temperature == 0.2 and chat.user == "u"
        # max_tokens is set on the job as an upper bound (messages.prepare), not asked of
        # the chat request, whose budget check would refuse a large one.
        assert chat.token_limit is None
    named = chat_request(request(messages=[{"role": "user", "content": "hi"}], tools=[tool],
                                 tool_choice={"type": "tool", "name": "w"}))
    assert named.job_tool_choice().name == "w"


def test_unknown_fields_and_betas():
    with pytest.raises(InvalidRequest) as e:
        request(messages=[{"role": "user", "content": "hi"}], stop_sequence=["x"])
    assert e.value.param == "stop_sequence"
    check_betas("prompt-caching-2024-07-31, claude-code-20250219")
    check_betas(None)
    with pytest.raises(Unsupported) as e:
        check_betas("prompt-caching-2024-07-31,files-api-2025-04-14")
    assert "files-api-2025-04-14" in e.value.message


def test_max_tokens_as_an_upper_bound():
    """fit_max_tokens (the Messages door): max_tokens is lowered to what a job without one
    gets (the rest of the context, at most max_job_tokens // n), not refused."""
    entry = ModelEntry(name="m", backend="synthetic", weights="-", num_ctx=8192,
                       max_job_tokens=100)
    job = GenerationJob(id="j", model="m", messages=[], max_tokens=64000, fit_max_tokens=True)
    assert completion_budget(entry, job, room=5000) == 100
    assert completion_budget(entry, job, room=40) == 40
    assert completion_budget(entry, job.model_copy(update={"max_tokens": 7}), room=40) == 7
    assert completion_budget(entry, job.model_copy(update={"n": 4}), room=5000) == 25
    with pytest.raises(InvalidRequest):  # a fixed max_tokens past the budget stays refused
        completion_budget(entry, job.model_copy(update={"fit_max_tokens": False}), room=5000)
    # A prompt that fills the context by itself: the 400 says so.
    err = context_exceeded(job, 8192, 9000, completion_budget(entry, job, room=0))
    assert "your messages resulted in 9000 tokens, which leaves no room" in err.message


def test_a_final_assistant_message_rendered_open():
    """continue_final_message: the last assistant turn without its end of turn, its text
    as sent (a template that trims the text cannot hide where it ends)."""
    t = ChatTemplate("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}"
                     "<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    turns = [{"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": "It is"}]
    assert t.render(turns, continue_final_message=True) == (
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nIt is")
    blind = ChatTemplate("{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(InvalidRequest, match="cannot be continued"):
        blind.render(turns, continue_final_message=True)
