"""The chat request surface end to end on the real CPU model, with the official client:
logprobs, logit_bias, n, penalties, user."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import openai
import pytest

pytestmark = pytest.mark.model

HELLO = [{"role": "user", "content": "Say hello"}]
SEA = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_logprobs_per_token(chat):
    r = chat.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8,
                                     temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert isinstance(t.logprob, float) and t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
        assert len(t.top_logprobs) == 3
        alts = [a.logprob for a in t.top_logprobs]
        assert alts == sorted(alts, reverse=True)
        # Greedy decoding picks the most likely token.
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        assert sum(math.exp(a) for a in alts) <= 1.0 + 1e-6


def test_logprobs_without_top(chat):
    r = chat.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4,
                                     temperature=0, logprobs=True)
    assert [t.top_logprobs for t in r.choices[0].logprobs.content] == [[]] * 4
    plain = chat.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4,
                                         temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_logprobs_streamed(chat):
    kw = dict(model="smollm2", messages=HELLO, max_tokens=10, temperature=0, logprobs=True,
              top_logprobs=2)
    whole = chat.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for c in chat.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole]


def test_logit_bias_bans_and_forces(chat, tokenize):
    kw = dict(model="smollm2", messages=HELLO, max_tokens=6, temperature=0, logprobs=True)
    free = chat.chat.completions.create(**kw).choices[0].logprobs.content
    first = free[0].token
    (token_id,) = tokenize(first)
    banned = chat.chat.completions.create(logit_bias={str(token_id): -100}, **kw)
    assert banned.choices[0].logprobs.content[0].token != first
    forced = chat.chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=3, temperature=0,
        logit_bias={str(token_id): 100})
    assert forced.choices[0].message.content == first * 3


def test_n_choices_streamed_by_index(chat):
    kw = dict(model="smollm2", messages=SEA, max_tokens=8, temperature=1.0, seed=7, n=3)
    whole = chat.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts, roles, finishes = defaultdict(str), {}, {}
    for chunk in chat.chat.completions.create(stream=True, **kw):
        (c,) = chunk.choices
        if c.delta.role:
            roles[c.index] = c.delta.role
        texts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finishes[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert dict(texts) == {c.index: c.message.content for c in whole.choices}
    # Independent choices: different seeds per choice give different text.
    assert len(set(texts.values())) > 1


def test_frequency_and_presence_penalties_change_output(chat):
    kw = dict(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0)
    free = chat.completions.create(**kw).choices[0].text
    assert free.startswith(" 5, 6, 7, 8")
    freq = chat.completions.create(frequency_penalty=2.0, **kw).choices[0].text
    pres = chat.completions.create(presence_penalty=2.0, **kw).choices[0].text
    assert freq != free and pres != free
    # Penalising repeats means fewer repeated tokens: "," repeats least.
    assert freq.count(",") < free.count(",")


def test_user_is_accepted_and_logged(chat, web):
    r = chat.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2,
                                     temperature=0, user="alice-1234")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = web.log.read_text()
        if r.id in log and "alice-1234" in log:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the user was not logged with the request id")


@pytest.mark.parametrize("kw,param", [
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"5": 101}), "logit_bias.5"),
    (dict(logit_bias={"999999": 1}), "logit_bias"),
])
def test_surface_validation(chat, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2, **kw)
    assert e.value.body["param"] == param
