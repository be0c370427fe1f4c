"""What Ferry reads itself from an ExLlamaV2 model directory (Hugging Face layout).

ExLlamaV2 keeps only the *first* ``eos_token_id`` of config.json and has no chat template,
so the stop tokens and the template come from the files directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.templates import ChatTemplate, end_of_turn, find_chat_template


# Architectures with a vision tower in exllamav2 0.3.2 (exllamav2/architecture.py).
VISION_ARCHITECTURES = frozenset({
    "LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
    "Gemma3ForConditionalGeneration",
})
# These are Pixtral only with a pixtral vision_config (other Llava models are not supported).
_PIXTRAL_HOSTS = frozenset({"LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration"})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ids(value: Any) -> set[int]:
    """An ``eos_token_id`` as found in the wild: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _token_text(value: Any) -> str:
    """tokenizer_config.json spells tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class ModelDir:
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    # Added tokens of tokenizer.json (control tokens such as <|im_end|>): text -> id.
    added_tokens: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> "ModelDir":
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        tokenizer = _read_json(path / "tokenizer.json")
        added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])
                 if isinstance(t, dict) and "content" in t and "id" in t}
        return cls(path, _read_json(path / "config.json"),
                   _read_json(path / "generation_config.json"),
                   _read_json(path / "tokenizer_config.json"), added)

    @property
    def bos_token(self) -> str:
        return _token_text(self.tokenizer_config.get("bos_token"))

    @property
    def eos_token(self) -> str:
        return _token_text(self.tokenizer_config.get("eos_token"))

    @property
    def add_bos(self) -> bool:
        # Llama-style tokenizers prepend BOS unless told not to; models without a BOS don't.
        return bool(self.bos_token) and self.tokenizer_config.get("add_bos_token", True) is not False

    def chat_template(self, name: str | None = None) -> ChatTemplate | None:
        source = find_chat_template(self.path, self.tokenizer_config, name)
        if not source:
            return None
        return ChatTemplate(source, bos_token=self.bos_token, eos_token=self.eos_token)

    def eos_ids(self) -> set[int]:
        """config.json ∪ generation_config.json ∪ tokenizer_config.json's eos_token."""
        ids = _ids(self.config.get("eos_token_id"))
        ids |= _ids(self.config.get("text_config", {}).get("eos_token_id"))
        ids |= _ids(self.generation_config.get("eos_token_id"))
        if self.eos_token in self.added_tokens:
            ids.add(self.added_tokens[self.eos_token])
        return ids

    def vision_architecture(self) -> str | None:
        """The architecture, if exllamav2 0.3.2 has a vision tower for it: Pixtral (Llava or
        Mistral3 with a pixtral vision_config), Qwen2-VL, Qwen2.5-VL, Gemma 3. Each needs
        its preprocessor_config.json, which exllamav2 reads when it loads the config."""
        archs = self.config.get("architectures") or []
        vision = self.config.get("vision_config")
        if not isinstance(vision, dict) or not (self.path / "preprocessor_config.json").is_file():
            return None
        for arch in archs:
            if arch in VISION_ARCHITECTURES and (
                    arch not in _PIXTRAL_HOSTS or vision.get("model_type") == "pixtral"):
                return arch
        return None

    def end_of_turn_id(self, template: ChatTemplate | None) -> int | None:
        token = template and end_of_turn(template, list(self.added_tokens))
        return self.added_tokens[token] if token else None
