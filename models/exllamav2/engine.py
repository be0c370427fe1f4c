"""The GPU line: the only module that imports exllamav2, and only when a worker loads it.

Written against exllamav2 0.3.2 (see /work/shared/docs/exllamav2.md and the 0.3.2 source).
Never run on a GPU in this repository's CI: ``make gpu-check`` is how it is verified on a
GPU host. Everything that can be decided without CUDA lives in the sibling modules.

Load order, as exllamav2 requires: config (sizes set before the model is built), draft model
first so it lands on GPU 0, lazy cache with ``load_autosplit`` (or a manual split and then
the cache), tokenizer; the generator is built by ``new_generator`` (again after a failure).
A vision model's tower is loaded first, on GPU 0 (``ExLlamaV2VisionTower.load``; it has no
autosplit), so that the model's autosplit sees the memory it took.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from models.exllamav2.grammar import MaskFilterLogic
from models.guidance import Grammar
from models.exllamav2.options import CacheType, ExLlamaV2Options, Limits
from models.exllamav2.spec import JobSpec, job_kwargs

log = logging.getLogger(__name__)

# exllamav2 0.3.2 cache classes by registry name. (ExLlamaV2Cache_8bit is FP8, which the
# dynamic generator rejects.)
_CACHE_CLASSES = {"FP16": "ExLlamaV2Cache", "Q8": "ExLlamaV2Cache_Q8",
                  "Q6": "ExLlamaV2Cache_Q6", "Q4": "ExLlamaV2Cache_Q4"}


def _cache_class(kind: CacheType):
    import exllamav2

    return getattr(exllamav2, _CACHE_CLASSES[kind])


def paged_attention_available(no_flash_attn: bool) -> bool:
    """Paged attention needs flash-attn >= 2.5.7, which needs an Ampere (8.x) GPU or newer."""
    from exllamav2.attn import has_flash_attn_with_paged

    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return bool(has_flash_attn_with_paged) and not no_flash_attn and all(c[0] >= 8 for c in caps)


def generator_kwargs(model: Any, cache: Any, tokenizer: Any, limits: Limits, max_batch_size: int,
                     paged: bool, draft_model: Any = None, draft_cache: Any = None) -> dict:
    """Keyword arguments of ``ExLlamaV2DynamicGenerator``, which ignores unknown ones
    silently: the names are checked against its signature in tests/test_exllamav2_api.py."""
    kwargs: dict[str, Any] = dict(
        model=model, cache=cache, tokenizer=tokenizer, max_batch_size=max_batch_size,
        max_seq_len=limits.max_seq_len, max_chunk_size=limits.chunk, paged=paged,
    )
    if draft_model is not None:
        kwargs.update(draft_model=draft_model, draft_cache=draft_cache,
                      num_draft_tokens=limits.num_draft_tokens)
    return kwargs


@functools.cache
def _mask_filter_class() -> type:
    """Ferry's mask filter as the ExLlamaV2Filter subclass the generator needs (it calls
    base-class methods such as ``background_drop``, ``get_next`` and
    ``background_prepare_logit_mask``)."""
    from exllamav2.generator.filters import ExLlamaV2Filter

    return type("FerryMaskFilter", (MaskFilterLogic, ExLlamaV2Filter), {})


class Exl2Engine:
    def __init__(self, model_dir: Path, limits: Limits, opts: ExLlamaV2Options,
                 vision: bool = False):
        from exllamav2 import ExLlamaV2Tokenizer
        from exllamav2.generator import (ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob,
                                         ExLlamaV2Sampler)

        if not torch.cuda.is_available():
            raise RuntimeError("the exllamav2 backend needs a CUDA GPU; none is visible")
        self._Generator, self._Job = ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
        self._Settings = ExLlamaV2Sampler.Settings
        self.limits = limits
        self.draft_model = self.draft_cache = None
        self.vision_tower = None
        if opts.draft is not None:
            # The generator wants the draft's max_seq_len >= the model's and equal cache sizes.
            _, self.draft_model, self.draft_cache = self._load(
                Path(opts.draft.weights).expanduser(), opts.draft.cache_type, "auto")
        self.config, self.model, self.cache = self._load(model_dir, opts.cache_type, opts.gpu_split,
                                                         with_vision=vision)
        self.tokenizer = ExLlamaV2Tokenizer(self.config)
        self._warm_tokenizer()
        self.paged = paged_attention_available(self.config.no_flash_attn)
        self.max_batch_size = limits.max_batch_size if self.paged else 1
        if self.paged:
            log.info("exllamav2: paged attention on; up to %d sequences decoded together in a "
                     "cache of %d tokens", self.max_batch_size, limits.cache_tokens)
        else:
            log.warning("exllamav2: flash-attn >= 2.5.7 on an Ampere-or-newer GPU is not "
                        "available, so paged attention is OFF: this worker runs ONE job at a "
                        "time and queues the rest. Install flash-attn to batch requests.")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def _load(self, model_dir: Path, cache_type: CacheType, gpu_split, with_vision: bool = False):
        from exllamav2 import ExLlamaV2, ExLlamaV2Config

        cfg = ExLlamaV2Config(str(model_dir))
        cfg.arch_compat_overrides()
        if self.limits.max_seq_len > cfg.max_seq_len:
            log.warning("exllamav2: num_ctx %d exceeds %s's trained context of %d tokens",
                        self.limits.max_seq_len, model_dir.name, cfg.max_seq_len)
        # Sizes are read when the model is built: set them first.
        cfg.max_seq_len = self.limits.max_seq_len
        cfg.max_input_len = self.limits.chunk
        cfg.max_attention_size = self.limits.chunk ** 2
        if with_vision:
            self.vision_tower = self._load_vision(cfg)
        model = ExLlamaV2(cfg)
        cache_cls = _cache_class(cache_type)
        if gpu_split == "auto":
            cache = cache_cls(model, max_seq_len=self.limits.cache_tokens, lazy=True)
            model.load_autosplit(cache, progress=False)
        else:
            model.load(gpu_split=list(gpu_split))  # GB per device
            cache = cache_cls(model, max_seq_len=self.limits.cache_tokens)
        return cfg, model, cache

    @staticmethod
    def _load_vision(cfg: Any) -> Any:
        from exllamav2 import ExLlamaV2VisionTower

        tower = ExLlamaV2VisionTower(cfg)
        tower.load(progress=False)
        log.info("exllamav2: vision tower loaded (%s)", cfg.vision_model_type)
        return tower

    def _warm_tokenizer(self) -> None:
        # The tokenizer builds lookup tables lazily; built here, task threads may then encode
        # concurrently with the loop thread decoding.
        self.tokenizer.get_id_to_piece_list(True)
        self.tokenizer.get_id_to_piece_list(False)
        self.tokenizer.encode("warm up", encode_special_tokens=True)
        self.tokenizer.encode("warm up", encode_special_tokens=False)

    # --- for the backend (task threads) ---------------------------------------------------

    def encode(self, text: str, add_bos: bool, embeddings: list | None = None) -> list[int]:
        # Special tokens in the rendered template are control tokens and must encode as such;
        # the embeddings' text aliases become their token id ranges.
        return self.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True,
                                     embeddings=embeddings)[0].tolist()

    def new_filters(self, grammar: Grammar) -> list:
        """A fresh filter for one job (a copy of the compiled grammar's matcher, ~1 µs),
        built in the task thread."""
        return [_mask_filter_class()(self.model, self.tokenizer, grammar)]

    def piece(self, token: int) -> str:
        # The model's head can be wider than the tokenizer's vocabulary; such ids (masked off,
        # but possible among top-k alternatives of probability 0) have no text.
        pieces = self.tokenizer.get_id_to_piece_list(False)
        return pieces[token] if 0 <= token < len(pieces) else ""

    # --- for the loop thread ----------------------------------------------------------------

    def new_generator(self) -> Any:
        return self._Generator(**generator_kwargs(
            self.model, self.cache, self.tokenizer, self.limits, self.max_batch_size,
            self.paged, self.draft_model, self.draft_cache))

    def warmup(self, generator: Any) -> None:
        """Run before the loop starts: kernel autotuning happens on the first generations."""
        generator.warmup()

    def image_embedding(self, image: Any) -> Any:
        """The ExLlamaV2MMEmbedding of a PIL image (loop thread only: GPU work)."""
        with torch.inference_mode():
            return self.vision_tower.get_image_embeddings(
                model=self.model, tokenizer=self.tokenizer, image=image, text_alias=None)

    def new_job(self, spec: JobSpec, identifier: int) -> Any:
        settings = self._Settings(**spec.settings)
        ids = torch.tensor([spec.input_ids], dtype=torch.long)
        return self._Job(**job_kwargs(spec, identifier, ids, settings))

    def close(self) -> None:
        for model in (self.model, self.draft_model, self.vision_tower):
            if model is not None:
                model.unload()
        self.cache = self.draft_cache = None
        torch.cuda.empty_cache()
