"""The names the ExLlamaV2 backend passes to exllamav2 0.3.2, checked against the installed
package itself: its Settings fields, the job's and generator's keyword arguments (both
swallow unknown keywords silently) and the classes and attributes engine.py uses, and
Ferry's llguidance mask filter composed with exllamav2's real filter base class, driven as
the generator drives it (mask computed in a thread pool, logits masked, token fed) over a
grammar compiled for SmolLM2's tokenizer.json.

Needs the exllamav2 package: installed (a GPU host), or the 0.3.2 wheel unpacked, not
installed, at FERRY_TEST_EXLLAMAV2_PATH, which ``make test`` does on every machine. Without
CUDA, exllamav2 imports only with its compiled extension stubbed out, as its own CPU-side
tests do; the check runs in a subprocess so the stub and the path stay there. Nothing
here loads a model or generates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

UNPACKED = os.environ.get("FERRY_TEST_EXLLAMAV2_PATH", "")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None and not Path(UNPACKED, "exllamav2").is_dir(),
    reason="exllamav2 is not installed (pip install '.[gpu]' on a GPU host) and "
           "FERRY_TEST_EXLLAMAV2_PATH names no unpacked 0.3.2 wheel (make test sets it)")

CHECK = r"""
import dataclasses, inspect, json, sys, types
import torch
if not torch.cuda.is_available():
    sys.modules["exllamav2_ext"] = types.ModuleType("exllamav2_ext")  # import-only stub
import exllamav2, exllamav2.attn
from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
from models.exllamav2.engine import _CACHE_CLASSES, generator_kwargs
from models.exllamav2.options import ExLlamaV2Options
from models.exllamav2.sampling import settings_fields, token_bias
from models.exllamav2.spec import JobSpec, job_kwargs
from config.contract.job import Sampling

def params(f):
    return sorted(inspect.signature(f).parameters)

limits = ExLlamaV2Options(draft={"weights": "/d"}).limits(4096)
gen_kw = generator_kwargs("m", "c", "t", limits, 8, True, "dm", "dc")
settings = ExLlamaV2Sampler.Settings(**settings_fields(
    Sampling(temperature=0.3, frequency_penalty=0.5), token_bias({3: 1.0}, 100)))
spec = JobSpec(input_ids=(1, 2, 3), max_new_tokens=9, settings={}, seed=5,
               stop_conditions=(2, 7, "END"), top_logprobs=4)
job = ExLlamaV2DynamicJob(**job_kwargs(spec, 77, torch.tensor([[1, 2, 3]]), settings))
import pathlib, tempfile
from concurrent.futures import ThreadPoolExecutor
from exllamav2 import ExLlamaV2VisionTower
from exllamav2.generator import ExLlamaV2MMEmbedding
from exllamav2.generator.filters import ExLlamaV2Filter
from models import guidance
from models.constraints import Constraint
from models.exllamav2.engine import Exl2Engine, _mask_filter_class
from tests import exl2_model_dirs as dirs

walk = []
gguf = dirs.smollm2_gguf()
if gguf is not None:
    d = dirs.smollm2(pathlib.Path(tempfile.mkdtemp()), gguf)
    lltok = guidance.tokenizer_from_hf((d / "tokenizer.json").read_text(), 49152, [2])
    grammar = guidance.compile_grammar(Constraint({
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        lltok, 49152, "response_format")
    f = _mask_filter_class()(None, types.SimpleNamespace(eos_token_id=2), grammar)
    pool = ThreadPoolExecutor(max_workers=1)
    f.background_drop(); f.begin("")
    for t in lltok.tokenize_str('{"a": 7}') + [None]:
        assert f.get_next(mask=True) is True
        logits = f.mask_logits(torch.zeros(49152 + 64))
        allowed = (logits == 0).nonzero().flatten().tolist()
        walk.append(allowed == [2] if t is None else t in allowed and 2 not in allowed)
        if t is not None:
            f.feed(torch.tensor([[t]]))
            f.background_prepare_logit_mask(pool)  # as iterate() schedules it
    pool.shutdown()

print(json.dumps({
    "filter_walk": walk,
    "filter_is_exllamav2_filter": issubclass(_mask_filter_class(), ExLlamaV2Filter),
    "filter_methods": [getattr(_mask_filter_class(), m).__qualname__.split(".")[0] for m in
                       ("begin", "feed", "next", "use_background_worker", "can_mask_logits",
                        "prepare_logit_mask", "mask_logits", "get_next", "background_drop",
                        "background_prepare_logit_mask")],
    "vision_params": params(ExLlamaV2VisionTower.get_image_embeddings),
    "vision_load_params": params(ExLlamaV2VisionTower.load),
    "embedding_alias": "text_alias" in ExLlamaV2MMEmbedding.__annotations__,
    "tokenizer_methods": [hasattr(ExLlamaV2Tokenizer, m) for m in
                          ("decode", "get_id_to_piece_list", "encode")],
    "config_vision_attrs": [n in ExLlamaV2Config.__annotations__ for n in
                            ("vision_model_type", "vision_max_size")],
    "version": exllamav2.__version__,
    "settings": sorted(f.name for f in dataclasses.fields(ExLlamaV2Sampler.Settings)),
    "settings_ok": [settings.temperature, settings.token_frequency_penalty,
                    settings.token_repetition_penalty, settings.top_k],
    "job_params": params(ExLlamaV2DynamicJob.__init__),
    "job_kwargs": sorted(job_kwargs(spec, 1, None, None)),
    "job": [sorted(job.stop_tokens), sorted(job.stop_strings), job.max_new_tokens,
            job.return_top_tokens, job.return_probs, job.identifier, job.new_tokens,
            job.gen_settings is settings],
    "generator_params": params(ExLlamaV2DynamicGenerator.__init__),
    "generator_kwargs": sorted(gen_kw),
    "generator_methods": [hasattr(ExLlamaV2DynamicGenerator, m) for m in
                          ("enqueue", "iterate", "cancel", "num_remaining_jobs", "warmup")],
    "caches": [hasattr(exllamav2, n) for n in _CACHE_CLASSES.values()],
    "config_attrs": [n in ExLlamaV2Config.__annotations__ for n in
                     ("max_seq_len", "max_input_len", "max_attention_size", "no_flash_attn",
                      "vocab_size")],
    "load_params": params(ExLlamaV2.load), "autosplit_params": params(ExLlamaV2.load_autosplit),
    "encode_params": params(ExLlamaV2Tokenizer.encode),
    "paged_flag": hasattr(exllamav2.attn, "has_flash_attn_with_paged"),
}))
"""


@pytest.fixture(scope="module")
def api():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    if UNPACKED:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [UNPACKED, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pinned_version(api):
    assert api["version"] == "0.3.2"


def test_settings_fields_are_all_set(api):
    from models.exllamav2.sampling import SETTINGS_FIELDS

    assert set(api["settings"]) == SETTINGS_FIELDS
    assert api["settings_ok"] == [0.3, 0.5, 1.0, 0]


def test_job_keywords_exist_and_arrive(api):
    assert set(api["job_kwargs"]) <= set(api["job_params"])
    assert api["job"] == [[2, 7], ["END"], 9, 4, True, 77, 0, True]


def test_generator_keywords_and_methods_exist(api):
    assert set(api["generator_kwargs"]) <= set(api["generator_params"])
    assert all(api["generator_methods"])


def test_engine_names_exist(api):
    assert all(api["caches"]) and all(api["config_attrs"]) and api["paged_flag"]
    assert {"gpu_split"} <= set(api["load_params"])
    assert {"cache", "progress"} <= set(api["autosplit_params"])
    assert {"add_bos", "encode_special_tokens", "embeddings"} <= set(api["encode_params"])
    assert all(api["tokenizer_methods"])


def test_vision_names_exist(api):
    assert {"model", "tokenizer", "image", "text_alias"} <= set(api["vision_params"])
    assert "progress" in api["vision_load_params"]
    assert api["embedding_alias"] and all(api["config_vision_attrs"])


def test_mask_filter_composes_with_the_real_base_class(api):
    assert api["filter_is_exllamav2_filter"]
    # Ferry's methods where it overrides the generator's calls, the base class's elsewhere.
    assert api["filter_methods"] == ["MaskFilterLogic"] * 7 + ["ExLlamaV2Filter"] * 3
    if not api["filter_walk"]:
        pytest.skip("the SmolLM2 weights package is not installed")
    # Each token of {"a": 7} allowed in turn (the end token never), then the end token only.
    assert api["filter_walk"] == [True] * len(api["filter_walk"])
    assert len(api["filter_walk"]) > 4
