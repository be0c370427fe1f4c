"""The Responses shaping with no services: core events in, Responses stream events and
objects out (``tasks/core/response_events.py``), and the input translation."""

from __future__ import annotations

from config.contract import events
from config.errors import GenerationFailed
from tasks.core.response_events import ResponseBuilder
from tasks.core.responses import input_messages
from tasks.core.schemas.responses import CreateResponseRequest


def builder() -> ResponseBuilder:
    return ResponseBuilder({"id": "resp_abc", "object": "response"})


def feed(b: ResponseBuilder, evs) -> list[dict]:
    out = b.opening()
    for ev in evs:
        out += b.feed(ev)
    return out


def test_a_function_call_streams_added_deltas_done():
    b = builder()
    out = feed(b, [events.Started("w", 5),
                   events.ToolCallDelta(0, 0, '{"city": ', id="call_1", name="get_weather"),
                   events.ToolCallDelta(0, 0, '"Paris"}'),
                   events.Finish(0, "tool_calls", 6), events.Done(5, 6, cached_tokens=3)])
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    final = out[-1]["response"]
    [call] = final["output"]
    assert call == {"id": "fc_abc_0", "type": "function_call", "call_id": "call_1",
                    "name": "get_weather", "arguments": '{"city": "Paris"}',
                    "status": "completed"}
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 3}
    assert final["usage"]["total_tokens"] == 11
    # Continuing it: the call as an assistant message with tool_calls.
    assert b.messages() == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]


def test_the_same_events_give_the_same_stream():
    evs = [events.Delta(0, "a"), events.Delta(0, "b"), events.Finish(0, "stop", 2),
           events.Done(1, 2)]
    assert feed(builder(), evs) == feed(builder(), evs)


def test_a_failure_and_a_cut_off():
    b = builder()
    out = feed(b, [events.Delta(0, "a")]) + b.fail(GenerationFailed("boom"))
    assert out[-1]["type"] == "response.failed"
    assert out[-1]["response"]["error"] == {"code": "server_error", "message": "boom"}
    b = builder()
    out = feed(b, [events.Delta(0, "a"), events.Finish(0, "length", 1), events.Done(1, 1)])
    assert out[-1]["type"] == "response.incomplete"
    assert out[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_input_items_as_chat_messages():
    req = CreateResponseRequest.model_validate({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": "two"}]})
    msgs = input_messages(req)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    assert msgs[0]["content"] == [{"type": "text", "text": "hi"}]
