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

BackendName = Literal["llama_cpp", "exllamav2", "sentence_transformers", "synthetic"]


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
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _default_queue(self) -> "ModelEntry":
        if not self.queue:
            self.queue = f"ferry.{self.name}"
        return self

    @property
    def kind(self) -> Literal["chat", "embedding"]:
        return "embedding" if self.backend == "sentence_transformers" else "chat"

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
