"""Prompt prefix reuse on the real CPU model, through the real stack: a chat's next turn
reads the earlier turns from the KV cache the last one left (``cached_tokens``), replies are
the same token for token and logprob for logprob as with reuse off (``smollm2-cold``, the
same weights with ``prefix_reuse = false``), ``n`` choices share one evaluation of their
prompt, and the Prometheus counters say what was evaluated and what was reused.

Every test opens its system prompt with its own nonce, so no cache left by another test
shares more than the chat template's first tokens with it.
"""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.services import Worker

pytestmark = pytest.mark.model

# The chat template's opening ("<|im_start|>system\n") is shared by every prompt.
TEMPLATE_OPENING = 8


@pytest.fixture(scope="module")
def cold_worker(redis_server, logs):
    worker = Worker("smollm2-cold", redis_server.url, logs).start()
    yield worker
    worker.stop()


def system(words: int = 60) -> dict:
    rules = " ".join(f"Rule {i}: be brief about {i}." for i in range(words // 6))
    return {"role": "system", "content": f"Session {uuid.uuid4().hex}. {rules}"}


def chat(web, messages: list[dict], model: str = "smollm2", **kw) -> dict:
    r = requests.post(web.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": 12, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def metric(web, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in requests.get(web.url + "/metrics", timeout=5).text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and all(w in (m.group(2) or "") for w in want):
            return float(m.group(3))
    return 0.0


def test_a_second_turn_reads_the_first_from_cache(web, smollm2_worker):
    messages = [system(), {"role": "user", "content": "Name a colour."}]
    first = chat(web, messages)
    assert cached(first) <= TEMPLATE_OPENING
    messages += [first["choices"][0]["message"], {"role": "user", "content": "Another one?"}]
    second = chat(web, messages)
    # At least the whole first prompt (and its reply, as far as it tokenizes the same).
    assert first["usage"]["prompt_tokens"] <= cached(second) < second["usage"]["prompt_tokens"]


def test_completions_report_cached_tokens_in_the_stream_usage_too(web, smollm2_worker):
    prompt = f"{uuid.uuid4().hex} " + " ".join(["The ferry crossed the river."] * 20)
    body = {"model": "smollm2", "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    def usage(text: str) -> dict:
        with requests.post(web.url + "/v1/completions", json={**body, "prompt": text},
                           stream=True, timeout=120) as r:
            chunks = [line for line in r.iter_lines() if line.startswith(b"data: {")]
        return json.loads(chunks[-1][6:])["usage"]

    first = usage(prompt)
    again = usage(prompt + " Then it turned back.")
    assert first["prompt_tokens_details"]["cached_tokens"] <= 1
    assert again["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 1


def conversation_turns(web, model: str, convs: list[list[dict]], turns: int) -> list[dict]:
    """Turn-major over the conversations (each turn of each finds the others' caches
    beside its own), greedy, with log probabilities; the bodies in order."""
    out = []
    for t in range(turns):
        for c, messages in enumerate(convs):
            messages.append({"role": "user", "content": f"Question {t} of {c}: why?"})
            body = chat(web, messages, model, logprobs=True, top_logprobs=3)
            messages.append(body["choices"][0]["message"])
            out.append(body)
    return out


def test_replies_are_the_same_with_reuse_on_and_off(web, smollm2_worker, cold_worker):
    start = [system(90) for _ in range(3)]
    warm = conversation_turns(web, "smollm2", [[s] for s in start], 3)
    cold = conversation_turns(web, "smollm2-cold", [[s] for s in start], 3)
    for w, c in zip(warm, cold):
        assert w["choices"][0]["message"] == c["choices"][0]["message"]
        # Logprobs are floats from the logits: equal only if every logit is the same.
        assert w["choices"][0]["logprobs"] == c["choices"][0]["logprobs"]
        assert w["usage"]["prompt_tokens"] == c["usage"]["prompt_tokens"]
        assert cached(c) == 0
    # Reuse did happen: every turn after the first read its conversation from cache.
    later = warm[len(start):]
    assert all(cached(b) > b["usage"]["prompt_tokens"] // 2 for b in later)


@pytest.mark.parametrize("model,copies", [("smollm2", 1), ("smollm2-cold", 3)])
def test_n_choices_evaluate_their_prompt_once(web, smollm2_worker, cold_worker, model,
                                              copies):
    messages = [system(90), {"role": "user", "content": "Say three words."}]
    before = {s: metric(web, "ferry_prompt_tokens_total", model=model, source=s)
              for s in ("evaluated", "cached")}
    body = chat(web, messages, model, n=3)
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: three times the same reply
    prompt, reused = body["usage"]["prompt_tokens"], cached(body)
    evaluated = metric(web, "ferry_prompt_tokens_total", model=model, source="evaluated")
    # Reuse on: one evaluation (less what an earlier cache held); off: one per choice.
    assert evaluated - before["evaluated"] == copies * (prompt - reused)
    assert metric(web, "ferry_prompt_tokens_total", model=model,
                  source="cached") - before["cached"] == reused


def test_the_counters_count_a_warm_turns_reuse(web, smollm2_worker):
    messages = [system(), {"role": "user", "content": "Name a fruit."}]
    first = chat(web, messages)
    messages += [first["choices"][0]["message"], {"role": "user", "content": "And another?"}]
    before = metric(web, "ferry_prompt_tokens_total", model="smollm2", source="cached")
    ev_before = metric(web, "ferry_prompt_tokens_total", model="smollm2", source="evaluated")
    second = chat(web, messages)
    assert metric(web, "ferry_prompt_tokens_total", model="smollm2",
                  source="cached") - before == cached(second) > 0
    assert metric(web, "ferry_prompt_tokens_total", model="smollm2",
                  source="evaluated") - ev_before == \
        second["usage"]["prompt_tokens"] - cached(second)


def test_conversations_opening_at_once_on_one_system_prompt_evaluate_it_once(
        web, smollm2_worker, cold_worker):
    opening = system(120)
    questions = ["Name a bird.", "Name a tree.", "Name a fish."]

    def first_turns(model: str) -> list[dict]:
        with ThreadPoolExecutor(len(questions)) as pool:
            return list(pool.map(lambda q: chat(web, [opening, {"role": "user", "content": q}],
                                                model, logprobs=True), questions))

    warm, cold = first_turns("smollm2"), first_turns("smollm2-cold")
    for w, c in zip(warm, cold):
        assert w["choices"][0]["message"] == c["choices"][0]["message"]
        assert w["choices"][0]["logprobs"] == c["choices"][0]["logprobs"]
    # Whichever came first evaluated the system prompt; the others copied it (the user's
    # question, the template's turn markers and the reply prompt are under 20 tokens).
    copied = [b for b in warm if cached(b) >= b["usage"]["prompt_tokens"] - 20]
    assert len(copied) >= len(questions) - 1, [b["usage"] for b in warm]
