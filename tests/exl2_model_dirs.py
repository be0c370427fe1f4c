"""Model directories as Hugging Face exports lay them out (config.json, generation_config.json,
tokenizer.json's added tokens, tokenizer_config.json), without weights: what the ExLlamaV2
backend reads itself. The token ids are those of the real model families."""

from __future__ import annotations

import json
from pathlib import Path

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
