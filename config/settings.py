"""Settings: ``FERRY_*`` environment variables over a TOML file over defaults.

Loaded once by ``load_settings()`` and passed down explicitly; nothing else reads the
environment. The TOML file is ``$FERRY_CONFIG`` when set, else ``config/ferry.toml``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from config.tenants import ApiKey

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
    # Digits of a JSON schema integer that sets no minimum or maximum (structured output):
    # 15 digits are exact in a double (2^53 > 10^15), as JavaScript clients read numbers, and
    # a model repeating a digit stops there instead of filling max_tokens with one number.
    max_integer_digits: int = Field(default=15, ge=1, le=100)
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
    # The memory of the Redis that `make run` starts (with noeviction: past it, writes fail
    # with an error and no key is ever dropped): room for a day of jobs and a large batch's
    # bookkeeping, bounded so that a flood fails cleanly instead of swapping the host.
    redis_maxmemory: str = "2gb"
    # Log level of every process; at "debug" Celery workers also print their banner (queues,
    # task list), which says nothing at "info" that the processes' own lines do not.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
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
    # A queued job whose Celery message is in no queue for this long (seen missing twice) is
    # failed with ``job_lost``: a worker marks a job started milliseconds after taking its
    # message, so 5 s is far past that window even on a loaded host.
    job_lost_after: float = Field(default=5.0, gt=0)
    # How long a worker retries writing a job's start, end or events while Redis is
    # unreachable or loading its data: a Redis restarted by its supervisor is back in
    # seconds; past this the janitor ends the job instead.
    redis_retry_seconds: float = Field(default=30.0, ge=0)
    # Prefix affinity (tasks/routing.py): a chat turn goes to the worker that served the
    # conversation before, if live and with a free thread. On: it acts only with 2+ live
    # workers of a model, and a wrong guess costs a cache miss, never an answer.
    affinity: bool = True
    # How long a worker is named as holding a prefix: a 10-minute pause in a conversation
    # is about as long as a busy worker's cache keeps an idle sequence.
    affinity_ttl: float = Field(default=600.0, gt=0)
    # Jobs that may wait in a worker's own queue beyond its free threads: 0, as a cold start
    # on an idle worker beats waiting behind a busy one for short prompts.
    affinity_max_queued: int = Field(default=0, ge=0)
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
    # Bearer keys accepted on /v1 (FERRY_API_KEYS: a JSON list, or keys separated by commas;
    # or [[api_keys]] tables): plain strings, or objects with a name and limits
    # (config/tenants.py). None configured = open, as Ollama and llama.cpp's server are by
    # default on loopback.
    api_keys: Annotated[list[ApiKey], NoDecode] = []
    # Requests per minute per API key; 0 = no limit.
    rate_limit_rpm: int = Field(default=0, ge=0)
    # Jobs one key may have queued or running at once (batch lines excepted; 0 = no limit):
    # half a model's default in-flight limit, so one key cannot fill a model's queue alone.
    key_max_in_flight: int = Field(default=32, ge=0)
    # Wrong API keys one client address may send per minute before all its keyed requests
    # get 429 for the rest of that minute: a few typos pass, guessing keys does not.
    auth_failures_per_minute: int = Field(default=10, ge=1)
    # When set, /metrics and /ready require ``Authorization: Bearer <admin key>``. Unset,
    # they stay open: who may scrape them is then the network's business (README, Security).
    admin_key: str = ""
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
    # Stored responses (``store: true``) live as long as jobs: long enough to continue a
    # conversation with ``previous_response_id`` later in the day, short enough to bound Redis.
    response_ttl: float = Field(default=86400.0, gt=0)
    # A submitted job no worker has started within this many seconds becomes ``expired``: its
    # submitter holds no connection, so it may wait longer than ``queue_timeout``, not forever.
    job_deadline: float = Field(default=3600.0, gt=0)
    # The replay buffer holds every event (token) of a job; it serves reconnecting watchers,
    # not archives (the result stays for ``job_ttl``), so it is kept this long after the last event.
    job_events_ttl: float = Field(default=3600.0, gt=0)
    # ...and capped at this many entries (one per published batch of events) per job, so one
    # huge job cannot fill Redis; a longer job's earliest events can no longer be replayed.
    job_events_max: int = Field(default=10000, ge=16)
    # A worker holds a streaming job's tokens after its first for up to this many ms and
    # sends them as one delta, with whatever other jobs have by then, in one round trip: a
    # message per token cost more CPU (web, worker, Redis) than the token's text; a few ms
    # is below what a reader of a stream can see. 0: send as fast as Redis takes them.
    stream_coalesce_ms: float = Field(default=5.0, ge=0, le=1000)
    # ...or until one job holds this many tokens (vLLM's stream_interval), so a fast model's
    # chunks stay small enough to look like streaming.
    stream_coalesce_tokens: int = Field(default=16, ge=1)
    # A job nobody streams (a request answered with one body, a batch line) has its tokens
    # after the first held up to this long, or this many, and sent as one delta per choice:
    # its reader needs only the whole answer, and every message costs the web, the worker
    # and Redis CPU. Watchers of its /v1/jobs/{id}/events see its text in steps this long.
    unstreamed_hold_ms: float = Field(default=1000.0, ge=0, le=60000)
    unstreamed_hold_tokens: int = Field(default=512, ge=1)
    # Largest result kept in a job's record (bytes of JSON): a long chat answer is tens of KB,
    # a 2,048-input embedding result megabytes, and a record lives a day. A bigger result is
    # answered in full to its synchronous client and left out of the record (it says so).
    job_result_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Seconds per webhook delivery attempt: a receiver should acknowledge quickly, work later.
    webhook_timeout: float = Field(default=10.0, gt=0)
    # Attempts after the first, backing off 1, 2, 4, 8, 16 s: rides out a receiver restart.
    webhook_retries: int = Field(default=5, ge=0)
    # Seconds before the first retry, doubled for each one after.
    webhook_backoff: float = Field(default=1.0, gt=0)
    # A delivery (or pending retry) its webhook worker took and did not finish within this
    # many seconds is presumed lost with the worker and handed out again: it bounds the delay
    # a worker crash adds. Must exceed the longest backoff plus an attempt (checked below).
    webhook_visibility_timeout: float = Field(default=120.0, gt=0)
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
    # its worker and handed out again; a batch with no progress for this long has its
    # unwritten chunks queued again. Must exceed the longest chunk: a line's wait in the
    # queue (batch_line_timeout) plus its run, so an hour and a quarter.
    batch_visibility_timeout: float = Field(default=4500.0, gt=0)
    # How long a batch line may wait in a model's queue (interactive requests go first).
    batch_line_timeout: float = Field(default=3600.0, gt=0)
    # Retries of a chunk that fails (an error, not a dead worker), backing off 1, 2, 4 ... 60
    # s: about five minutes of a transient fault (a Redis restart) before its lines are
    # reported failed, so that its batch still ends.
    batch_chunk_retries: int = Field(default=10, ge=0)
    # Requests per batch input file (OpenAI's limit): validation stops reading past it, so a
    # file of millions of tiny lines cannot make a worker hold them all.
    batch_max_lines: int = Field(default=50_000, ge=1)
    # An ended batch's record is kept this long (seconds), then deleted: a month to come back
    # for its results, not for ever.
    batch_retention: float = Field(default=30 * 86400.0, gt=0)
    # Files expire this long after they are written unless an upload's expires_after says
    # otherwise (OpenAI's default for batch files, inputs and outputs alike): then their
    # metadata and content on disk are deleted.
    file_ttl: float = Field(default=30 * 86400.0, gt=0)
    # Redis must not evict keys: an evicted queue list or job record is lost work nobody is
    # told about. With anything but ``noeviction``, web and workers refuse to start unless
    # this is set (an operator who accepts the risk, e.g. a managed Redis with its own policy).
    allow_redis_eviction: bool = False
    models: list[ModelEntry] = []

    @model_validator(mode="after")
    def _chunks_outlive_lines(self) -> "Settings":
        # A chunk whose lines may still be waiting when its visibility timeout passes would
        # be handed to a second worker and run twice.
        if self.batch_visibility_timeout <= self.batch_line_timeout:
            raise ValueError(
                f"batch_visibility_timeout ({self.batch_visibility_timeout:g} s) must exceed "
                f"batch_line_timeout ({self.batch_line_timeout:g} s), or a chunk still "
                "running is handed to a second worker")
        return self

    @field_validator("files_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _plain_keys(cls, keys: Any) -> Any:
        # From the environment: a JSON list, or "key-1,key-2".
        if isinstance(keys, str):
            text = keys.strip()
            if text.startswith("["):
                try:
                    keys = json.loads(text)
                except ValueError:
                    raise ValueError("not a JSON list of keys (or write the keys "
                                     "separated by commas)") from None
            else:
                keys = [k.strip() for k in text.split(",") if k.strip()]
        # Today's plain list (["alice", "bob"]) stays valid: a string is a key with no name.
        if isinstance(keys, list):
            return [{"key": k} if isinstance(k, str) else k for k in keys]
        return keys

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, keys: list[ApiKey]) -> list[ApiKey]:
        if len({k.key for k in keys}) != len(keys):
            raise ValueError("an API key is listed twice")
        return keys

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

    @model_validator(mode="after")
    def _webhook_retries_fit(self) -> "Settings":
        # A message held longer than the visibility timeout is handed out a second time while
        # the first worker still holds it: every long retry would be delivered twice.
        longest = self.webhook_backoff * 2 ** max(self.webhook_retries - 1, 0) + self.webhook_timeout
        if self.webhook_visibility_timeout <= longest:
            raise ValueError(f"webhook_visibility_timeout must exceed the longest webhook "
                             f"backoff plus webhook_timeout ({longest:g} s)")
        return self

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
