"""Benchmark: structured output at decode speed. One Ferry worker (SmolLM2, 1 thread, one
slot) and llama-cpp-python's server on the same GGUF and thread count (its GBNF grammar path)
as the peer, greedy, one stream at a time, side by side in one run:

- free decoding, ``json_object``, a nested ``json_schema`` (objects, arrays, enums, string
  formats, numeric bounds) and a ``required`` tool call on Ferry;
- free decoding, ``json_object`` and the same ``json_schema`` on the peer.

Decode tok/s = (chunks - 1) / (last chunk - first chunk), chunks that carried text (content
or tool-call arguments; one token each on both servers, except a tool call's head); TTFT
from the request (the peer reuses its KV cache for a repeated prompt and Ferry does not, so
TTFT is not like for like here; the decode rate is). Runs go round-robin. Every constrained output must validate against its schema in every run,
or the benchmark fails. Grammar compile + first mask of the nested schema is timed in
process against SmolLM2's vocabulary. Goals: constrained >= 0.9x free on Ferry, >= 1.5x the
peer's constrained, compile + first mask <= 50 ms. The mask's own cost per token (mask,
apply, accept, over the nested schema's output) is timed in process too: on a machine shared
with other work it is the steadier figure.

    python -m bench.structured [--runs 3] [--tokens 300] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp
import jsonschema

from bench.client import StreamResult, connector, stream
from bench.common import CheckFailed, print_table, save, times
from bench.stack import Stack, bench_entry

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "format": "email"},
        "born": {"type": "string", "format": "date"},
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "friends": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                             "since": {"type": "integer", "minimum": 1900,
                                                       "maximum": 2030}},
            "required": ["name", "since"], "additionalProperties": False}},
    },
    "required": ["name", "email", "born", "role", "age", "tags", "address", "friends"],
    "additionalProperties": False,
}


def unbounded(schema):
    """What the peer's converter (llama-cpp-python's json-schema-to-gbnf) enforces of a schema:
    it ignores numeric bounds and the email format, so its outputs are checked without them."""
    if isinstance(schema, list):
        return [unbounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: unbounded(v) for k, v in schema.items()
            if k not in ("minimum", "maximum") and (k, v) != ("format", "email")}


PEER_PERSON = unbounded(PERSON)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}

FREE = [{"role": "user", "content": "Tell me a long story about a ferry that crosses a wide "
                                    "river every day, and the people it carries."}]
DESCRIBE = [{"role": "user", "content": "Invent a person with three friends and describe "
                                        "them as JSON."}]
CAT = [{"role": "user", "content": "Describe a cat as a JSON object with its name, age and "
                                   "color."}]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
FREE_TOKENS = 128
GOALS = {"vs_free": 0.9, "vs_peer": 1.5, "compile_ms": 50.0}


def workloads(tokens: int) -> dict[str, dict]:
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                     "strict": True}}
    return {
        # About as long as the nested schema's answer: the attention cost of each step
        # grows with the context, so a longer free stream would be slower per token.
        "free": {"messages": FREE, "max_tokens": min(tokens, FREE_TOKENS)},
        "json_object": {"messages": CAT, "max_tokens": tokens,
                        "response_format": {"type": "json_object"}},
        "json_schema": {"messages": DESCRIBE, "max_tokens": tokens, "response_format": schema},
        "tool_required": {"messages": ASK, "max_tokens": tokens, "tools": [WEATHER],
                          "tool_choice": "required"},
    }


def peer_workloads(tokens: int) -> dict[str, dict]:
    """The peer's server takes a schema as ``{"type": "json_object", "schema": ...}``."""
    ours = workloads(tokens)
    schema = {"type": "json_object", "schema": PERSON}
    return {"free": ours["free"], "json_object": ours["json_object"],
            "json_schema": {**ours["json_schema"], "response_format": schema}}


def check(name: str, res: StreamResult, schema: dict) -> None:
    """A complete stream; constrained outputs finish (every string and array of the schemas
    is bounded), parse and validate."""
    if res.error or not res.text:
        raise CheckFailed(f"{name}: {res.error or 'empty output'}")
    if name == "free":
        return
    if res.finish_reason not in ("stop", "tool_calls"):
        raise CheckFailed(f"{name}: finished with {res.finish_reason} after {res.chunks} "
                          f"chunks: {res.text[-80:]!r}")
    try:
        value = json.loads(res.text)
        if name == "json_object" and not isinstance(value, dict):
            raise CheckFailed(f"{name}: not an object: {res.text[:80]!r}")
        if name == "json_schema":
            jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
        if name == "tool_required":
            jsonschema.validate(value, WEATHER["function"]["parameters"])
    except (ValueError, jsonschema.ValidationError) as e:
        raise CheckFailed(f"{name}: invalid output ({e}): {res.text[:120]!r}") from None


def decode_rate(res: StreamResult) -> float | None:
    if len(res.times) < 2:
        return None
    return (len(res.times) - 1) / (res.times[-1] - res.times[0])


async def measure(url: str, model: str, body: dict, extra: dict, runs: int
                  ) -> list[StreamResult]:
    out = []
    async with aiohttp.ClientSession(connector=connector(1, fresh=True)) as session:
        for _ in range(runs):
            out.append(await stream(session, url + "/v1/chat/completions",
                                    {"model": model, "temperature": 0, **body, **extra}, 300))
    return out


class Grammars:
    """llguidance against SmolLM2's vocabulary, in this process (no model weights loaded)."""

    def __init__(self, entry):
        import llama_cpp
        from llama_cpp._logger import set_verbose

        from models import guidance

        set_verbose(False)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(entry.weights_path()).encode(),
                                                          params)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n = llama_cpp.llama_vocab_n_tokens(vocab)
        eog = [t for t in range(self.n) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        self.tok = guidance.tokenizer_from_llama(vocab, eog)

    def compile(self, schema: dict):
        from models import guidance
        from models.constraints import Constraint

        return guidance.compile_grammar(Constraint(schema), self.tok, self.n, "response_format")

    def compile_ms(self, schema: dict) -> float:
        """Compile + first mask (median of 5, after one warm-up)."""
        spent = []
        for _ in range(6):
            t = time.perf_counter()
            self.compile(schema)
            spent.append((time.perf_counter() - t) * 1000)
        return statistics.median(spent[1:])

    def mask_us(self, schema: dict, text: str) -> float:
        """Per token of ``text``, what a constrained step adds to sampling in
        ``LlamaEngine.sample``: mask, applied to a copy of the logits and undone, token
        accepted."""
        import numpy as np

        mask = self.compile(schema).mask()
        logits = np.zeros(self.n, dtype=np.float32)
        tokens = self.tok.tokenize_str(text)
        t = time.perf_counter()
        for tok in tokens:
            raw = logits.copy()
            mask.apply(logits)
            np.copyto(logits, raw)
            mask.accept(tok)
        return (time.perf_counter() - t) / len(tokens) * 1e6

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_model_free(self.model)


def run(runs: int = 3, tokens: int = 300) -> dict:
    entry = bench_entry("smollm2")
    threads = entry.options["n_threads"]
    results: dict[str, dict[str, list[StreamResult]]] = {"ferry": {}, "peer": {}}
    with Stack("structured") as stack:
        stack.redis()
        stack.workers("smollm2", 1, options={"parallel": 1})
        web = stack.web()
        peer = stack.peer(entry.weights_path(), "structured", n_ctx=entry.num_ctx,
                          n_threads=threads, n_threads_batch=threads)
        sides = {"ferry": (web.url, workloads(tokens),
                           {"stream_options": {"include_usage": True}}),
                 "peer": (peer.url, peer_workloads(tokens), {"repeat_penalty": 1.0})}
        for side, (url, loads, extra) in sides.items():  # warm-up: first touches
            asyncio.run(measure(url, "smollm2", loads["free"] | {"max_tokens": 8}, extra, 1))
        # Round-robin, so that a busy spell of a shared machine falls on every workload.
        for i in range(runs):
            for name in workloads(tokens):
                order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
                for side, (url, loads, extra) in order:
                    if name in loads:
                        res, = asyncio.run(measure(url, "smollm2", loads[name], extra, 1))
                        check(name, res, PERSON if side == "ferry" else PEER_PERSON)
                        results[side].setdefault(name, []).append(res)
    grammars = Grammars(entry)
    try:
        compile_ms = grammars.compile_ms(PERSON)
        mask_us = grammars.mask_us(PERSON, results["ferry"]["json_schema"][0].text)
    finally:
        grammars.close()
    return report(results, runs, threads, compile_ms, mask_us)


def report(results: dict, runs: int, threads: int, compile: float, mask_us: float) -> dict:
    med = {side: {name: statistics.median(decode_rate(r) or 0.0 for r in rs)
                  for name, rs in by.items()} for side, by in results.items()}
    ttft = {side: {name: statistics.median(r.ttft for r in rs) * 1000
                   for name, rs in by.items()} for side, by in results.items()}
    free = med["ferry"]["free"]
    rows = []
    for name in workloads(0):
        ours, theirs = med["ferry"].get(name), med["peer"].get(name)
        rows.append([name, ours, ttft["ferry"].get(name), times(ours / free),
                     theirs, ttft["peer"].get(name),
                     times(ours / theirs) if theirs else None])
    print_table(f"Structured output: decode tok/s and TTFT ms, median of {runs} runs, "
                f"{threads} thread, greedy (Ferry: llguidance; peer: llama-cpp-python "
                f"server, GBNF)",
                ["", "Ferry tok/s", "TTFT", "vs free", "peer tok/s", "peer TTFT", "vs peer"],
                rows)
    constrained = [n for n in med["ferry"] if n != "free"]
    worst_free = min(med["ferry"][n] / free for n in constrained)
    worst_peer = min(med["ferry"][n] / med["peer"][n] for n in constrained
                     if n in med["peer"] and n != "free")
    step_us = 1e6 / free
    print(f"grammar compile + first mask, nested schema: {compile:.1f} ms "
          f"(goal <= {GOALS['compile_ms']:.0f}); mask per token {mask_us:.0f} us, "
          f"{mask_us / step_us:.1%} of a free decode step ({step_us / 1000:.1f} ms)")
    met = {"vs_free": worst_free >= GOALS["vs_free"], "vs_peer": worst_peer >= GOALS["vs_peer"],
           "compile_ms": compile <= GOALS["compile_ms"]}
    print(f"worst constrained vs free {worst_free:.2f}x (goal {GOALS['vs_free']}x), vs peer "
          f"{worst_peer:.2f}x (goal {GOALS['vs_peer']}x); goals met: {met}")
    data = {"runs": runs, "threads": threads, "tok_s": med, "ttft_ms": ttft,
            "compile_first_mask_ms": compile, "mask_us_per_token": mask_us,
            "worst_vs_free": worst_free,
            "worst_vs_peer": worst_peer, "goals": GOALS, "met": met}
    save("structured", data)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="one run each, to try the script")
    a = p.parse_args()
    if a.quick:
        run(1, a.tokens)
    else:
        run(a.runs, a.tokens)


if __name__ == "__main__":
    main()
