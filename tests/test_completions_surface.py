"""The legacy completions surface end to end on the real CPU model: several prompts, token
prompts, echo, legacy logprobs, best_of, suffix."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest

pytestmark = pytest.mark.model

GREEDY = dict(model="smollm2", max_tokens=5, temperature=0)


def one(client, prompt, **kw):
    return client.completions.create(prompt=prompt, **{**GREEDY, **kw}).choices[0].text


def test_list_of_prompts_is_prompt_major(chat):
    prompts = ["The sky is", "My favourite food is"]
    r = chat.completions.create(prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    expected = [one(chat, p) for p in prompts]
    assert [c.text for c in r.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert r.usage.completion_tokens == 4 * 5
    singles = [chat.completions.create(prompt=p, **GREEDY).usage.prompt_tokens for p in prompts]
    assert r.usage.prompt_tokens == sum(singles)


def test_list_of_prompts_streamed(chat):
    prompts = ["The sky is", "Once upon a time"]
    texts = defaultdict(str)
    finishes = {}
    for chunk in chat.completions.create(prompt=prompts, stream=True, **GREEDY):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert dict(texts) == {0: one(chat, prompts[0]), 1: one(chat, prompts[1])}
    assert finishes == {0: "length", 1: "length"}


def test_token_array_prompts(chat, tokenize):
    prompts = ["The sky is", "Once upon a time"]
    r = chat.completions.create(prompt=[tokenize(p) for p in prompts], **GREEDY)
    assert [c.text for c in r.choices] == [one(chat, p) for p in prompts]


def test_echo_of_a_token_prompt(chat, tokenize):
    r = chat.completions.create(prompt=tokenize("The sky is"), echo=True, **GREEDY)
    assert r.choices[0].text == "The sky is" + one(chat, "The sky is")
    assert r.usage.completion_tokens == 5


def test_legacy_logprobs(chat):
    r = chat.completions.create(prompt="The sky is", logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == logprob and top[tok] == logprob  # greedy


def test_echo_with_logprobs_covers_the_prompt(chat):
    r = chat.completions.create(prompt="The sky is", echo=True, logprobs=1, **GREEDY)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert r.choices[0].text == "The sky is" + one(chat, "The sky is")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[:3] == [0, 3, 7]


def test_logprobs_streamed(chat):
    kw = dict(prompt="The sky is", logprobs=2, **GREEDY)
    whole = chat.completions.create(**kw).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset


def test_best_of_returns_the_most_likely_candidates(chat):
    kw = dict(model="smollm2", prompt="My favourite animal is", max_tokens=6, temperature=1.0,
              seed=11)
    # The same seed gives the same candidates: look at all three, then ask for the best.
    every = chat.completions.create(n=3, logprobs=0, **kw)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
             for c in every.choices]
    ranked = [c.text for _, c in sorted(zip(means, every.choices), key=lambda x: -x[0])]
    best = chat.completions.create(best_of=3, n=2, **kw)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == ranked[:2]
    assert best.choices[0].logprobs is None
    assert best.usage.completion_tokens == every.usage.completion_tokens


def test_suffix_needs_fill_in_the_middle(chat):
    with pytest.raises(openai.BadRequestError) as e:
        chat.completions.create(prompt="def add(a, b):", suffix="    return c", **GREEDY)
    assert e.value.body["param"] == "suffix"
    assert "smollm2" in e.value.body["message"]


@pytest.mark.parametrize("kw,param", [
    (dict(logprobs=6), "logprobs"),
    (dict(best_of=1, n=2), "best_of"),
    (dict(best_of=2, stream=True), "best_of"),
    (dict(best_of=21), "best_of"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[[1, 2], []]), "prompt[1]"),
    (dict(prompt=[999999]), "prompt"),
])
def test_completions_validation(chat, kw, param):
    kw = {"prompt": "hi", **kw}
    with pytest.raises(openai.BadRequestError) as e:
        chat.completions.create(model="smollm2", max_tokens=2, **kw)
    assert e.value.body["param"] == param
