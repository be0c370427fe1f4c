"""Settings: ``FERRY_*`` environment variables over a TOML file over defaults.

Loaded once by ``load_settings()`` and passed down explicitly; nothing else reads the
environment. The TOML file is ``$FERRY_CONFIG`` when set, else ``config/ferry.toml``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG = Path(__file__).with_name("ferry.toml")

BackendName = Literal["llama_cpp", "exllamav2", "sentence_transformers", "onnxruntime",
                      "synthetic"]
EMBEDDING_BACKENDS = ("sentence_transformers", "onnxruntime")


class ModelEntry(BaseModel):
    """One served model. ``options`` are backend-specific and validated by the backend."""

    name: str
    backend: BackendName
    # A filesystem path, or ``pkg:<package>/<file>`` for weights shipped inside an installed
    # package (resolved without importing the package, which may have unmet dependencies).
    weights: str
    # Context length in tokens: prompt + completion must fit.
    num_ctx: int = Field(default=2048, ge=16)
    aliases: list[str] = []
    owned_by: str = "library"
    # Celery queue the model's workers consume; defaults to ``ferry.<name>``.
    queue: str = ""
    # Requests in flight (queued or running) beyond which new ones get 429: at ~100 tok/s
    # per CPU worker, 64 requests is minutes of waiting, and a client is better told to retry.
    max_pending: int = Field(default=64, ge=1)
    # The model takes images (chat ``image_url`` parts). The web process must know this
    # before it enqueues: it fetches and attaches the images of such models, and refuses
    # images for the others with a 400. The worker checks the claim when it loads the model.
    vision: bool = False
    # One job's budget: n x max_tokens at most this many tokens (a larger ask is a 400; a
    # request without max_tokens gets this divided by n per choice, or the rest of the
    # context if less). 32768 is sixteen full 2048-token replies, minutes of a CPU worker.
    max_job_tokens: int = Field(default=32768, ge=1)
    # ...and at most this long running: choices still generating then end with
    # finish_reason "length", as at max_tokens. Ten minutes covers a full context on a slow
    # CPU model; one job cannot hold the model's slots for an hour.
    max_job_seconds: float = Field(default=600.0, gt=0)
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _default_queue(self) -> "ModelEntry":
        if not self.queue:
            self.queue = f"ferry.{self.name}"
        return self

    @property
    def kind(self) -> Literal["chat", "embedding"]:
        return "embedding" if self.backend in EMBEDDING_BACKENDS else "chat"

    def weights_path(self) -> Path:
        if self.weights.startswith("pkg:"):
            package, _, rel = self.weights[4:].partition("/")
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(
                    f"model {self.name!r}: package {package!r} with its weights is not installed"
                )
            return Path(list(spec.submodule_search_locations)[0]) / rel
        return Path(self.weights).expanduser()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # Ferry's own Redis (started by `make run`); a non-standard port keeps it clear of a
    # system Redis on 6379.
    redis_url: str = "redis://127.0.0.1:6399/0"
    # Loopback unless the operator chooses to expose Ferry.
    host: str = "127.0.0.1"
    port: int = 8000
    # A worker refreshes its heartbeat this often (seconds)...
    heartbeat_interval: float = Field(default=1.0, gt=0)
    # ...and is presumed dead once it has been silent this long: requests it was running
    # fail with a 503 instead of hanging.
    worker_timeout: float = Field(default=5.0, gt=0)
    # How long a request may wait in the queue before it fails (and its task expires).
    queue_timeout: float = Field(default=300.0, gt=0)
    # Largest request body accepted (bytes).
    max_body_bytes: int = 16 * 1024 * 1024
    # A JSON schema (response_format, each tool's parameters) as compact JSON: validating it
    # runs in the web process, ~3 ms per KB; 32 KiB is ~800 string properties, well past
    # real schemas.
    max_schema_bytes: int = Field(default=32 * 1024, ge=1024)
    # Subschemas nested in one another ($ref targets included): 32 is three times OpenAI's
    # 10 levels and far below where the metaschema check or the grammar converter recurse
    # too deep (~150).
    max_schema_depth: int = Field(default=32, ge=2)
    # minLength / maxLength / minItems / maxItems and counted pattern repetitions: grammars
    # write each out in full. llama.cpp accepts maxLength 1000, refuses 2000 as too complex
    # and crashed the worker (SIGSEGV) at ~19,000; 1000 characters is a long field.
    max_schema_repeat: int = Field(default=1000, ge=1)
    # ...and all of them in one schema added up, which bounds the grammar's size: llama.cpp
    # parses it once per choice on the loop that decodes every stream; 10,000 is ~200 KB of
    # grammar and ~30 ms, where a 32 KiB schema of 671 maxLength-1000 fields took 1.7 s.
    max_schema_repeat_total: int = Field(default=10000, ge=1)
    # Prompts in one /v1/completions request, each a job: a list of millions of one-letter
    # prompts would otherwise enqueue millions of jobs. 32 stays under half of a model's
    # default in-flight limit (max_pending 64).
    max_prompts: int = Field(default=32, ge=1)
    # Bearer keys accepted on /v1 (a JSON list in FERRY_API_KEYS). None configured = open,
    # as Ollama and llama.cpp's server are by default on loopback.
    api_keys: list[str] = []
    # Requests per minute per API key; 0 = no limit.
    rate_limit_rpm: int = Field(default=0, ge=0)
    # Image URLs in messages are fetched by the server only if the operator turns it on: a
    # server that fetches what clients name can be pointed at internal services.
    fetch_image_urls: bool = False
    # ...and then only from public addresses, unless this is set too (tests, private nets).
    fetch_allow_private: bool = False
    # Larger images are refused (decoded or fetched), and fetching stops after this long.
    max_image_bytes: int = 20 * 1024 * 1024
    image_fetch_timeout: float = Field(default=10.0, gt=0)
    # Jobs (and their results) are kept a day after they are submitted: long enough to come
    # back for them, short enough that Redis does not fill up with old answers.
    job_ttl: float = Field(default=86400.0, gt=0)
    # A submitted job no worker has started within this many seconds becomes ``expired``: its
    # submitter holds no connection, so it may wait longer than ``queue_timeout``, not forever.
    job_deadline: float = Field(default=3600.0, gt=0)
    # The replay buffer holds every event (token) of a job; it serves reconnecting watchers,
    # not archives (the result stays for ``job_ttl``), so it is kept this long after the last event.
    job_events_ttl: float = Field(default=3600.0, gt=0)
    # ...and capped at this many entries (one per published batch of events) per job, so one
    # huge job cannot fill Redis; a longer job's earliest events can no longer be replayed.
    job_events_max: int = Field(default=10000, ge=16)
    # Seconds per webhook delivery attempt: a receiver should acknowledge quickly, work later.
    webhook_timeout: float = Field(default=10.0, gt=0)
    # Attempts after the first, backing off 1, 2, 4, 8, 16 s: rides out a receiver restart.
    webhook_retries: int = Field(default=5, ge=0)
    # Webhooks to private, loopback and link-local addresses are refused, so that a webhook
    # cannot reach into the operator's network (SSRF); tests and one-host setups allow them.
    webhook_allow_private: bool = False
    # Uploaded and batch output files (the Files API). Outside the source tree so that they
    # survive reinstalls; the web and the batch workers must both see it (one host or a
    # shared volume). Metadata lives in Redis.
    files_dir: Path = Path("~/.local/share/ferry/files")
    # Largest file upload (bytes): OpenAI's limit for a batch input file.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    # Batch lines per chunk: the unit of work a batch worker runs, commits once and, if it
    # dies, redoes. Small enough to finish well within batch_visibility_timeout.
    batch_chunk_lines: int = Field(default=64, ge=1)
    # Chunks a batch worker runs at once (its lines all in flight): enough to keep an
    # embedding worker's passes full; each line still queues behind interactive requests.
    batch_chunk_concurrency: int = Field(default=4, ge=1)
    # Seconds after which a chunk taken by a worker but not committed is presumed lost with
    # its worker and handed out again. Must exceed the longest chunk.
    batch_visibility_timeout: float = Field(default=1800.0, gt=0)
    # How long a batch line may wait in a model's queue (interactive requests go first).
    batch_line_timeout: float = Field(default=3600.0, gt=0)
    models: list[ModelEntry] = []

    @field_validator("files_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        seen: set[str] = set()
        for m in models:
            for name in (m.name, *m.aliases):
                if name in seen:
                    raise ValueError(f"model name or alias {name!r} is used twice")
                seen.add(name)
        return models

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("FERRY_CONFIG") or str(DEFAULT_CONFIG)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
