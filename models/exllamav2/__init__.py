"""The GPU backend: ExLlamaV2 0.3.2 with continuous batching.

Importing this package never imports ``exllamav2`` (on a CPU-only torch that import raises
``OSError: CUDA_HOME ...``). Only ``engine.py`` does, when a worker loads a registry entry
with ``backend = "exllamav2"``: everything else here (options, sampling, stop conditions,
the batching loop, result translation) is plain Python, tested on CPU against a generator
double that follows the 0.3.2 ``enqueue/iterate/cancel`` contract.

    task threads ──submit/cancel──▶ BatchLoop (one thread) ──▶ ExLlamaV2DynamicGenerator
        ▲                                │ result dicts
        └───── Delta/Finish/errors ◀─────┘ (results.ChoiceStream)
"""
