"""What ``make run`` starts and where it keeps its state, read from the settings and the
supervisord config. Every path and value the config takes from the environment is set here."""

from __future__ import annotations

import configparser
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from config import Registry, Settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONF = ROOT / "config" / "supervisord.cpu.conf"
# The supervisord group whose programs are model workers, each named after its model.
MODELS_GROUP = "models"
# Celery's warning to workers run as root or by a sudo/wheel member, 8 lines in each worker:
# the launcher says it once instead (a warnings filter matches a message's start).
ROOT_WARNING = "ignore:You're running the worker with superuser privileges"


@dataclass(frozen=True)
class Plan:
    settings: Settings
    conf: Path
    programs: tuple[str, ...]
    models: tuple[str, ...]

    @classmethod
    def read(cls, settings: Settings, conf: Path = DEFAULT_CONF) -> "Plan":
        parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
        if not parser.read(conf):
            raise FileNotFoundError(f"no supervisord config at {conf}")
        programs = tuple(s.partition(":")[2] for s in parser.sections()
                         if s.startswith("program:"))
        listed = parser.get(f"group:{MODELS_GROUP}", "programs", fallback="")
        models = tuple(p.strip() for p in listed.split(",") if p.strip())
        return cls(settings, conf, programs, models)

    # Redis's data and the logs live next to the uploaded files: one directory to back up,
    # and a restart finds files and their metadata together.
    @property
    def data_dir(self) -> Path:
        return self.settings.files_dir.parent

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def web_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def redis_port(self) -> int:
        return urlsplit(self.settings.redis_url).port or 6379

    def log_path(self, program: str) -> Path:
        return self.log_dir / f"{program}.log"

    def queue(self, model: str) -> str:
        return Registry(self.settings.models).resolve(model).queue

    def running(self, start_redis: bool) -> tuple[str, ...]:
        """The programs supervisord starts: all but Redis when one already answers."""
        return tuple(p for p in self.programs if start_redis or p != "redis")

    def environment(self, redis_server: str | None) -> dict[str, str]:
        """supervisord's environment, which its programs inherit. ``redis_server``: the binary
        to start, or None to use the Redis at FERRY_REDIS_URL."""
        env = dict(os.environ)
        # The venv's python and gunicorn first (not resolved: a venv's python is a symlink).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(
            PYTHONUNBUFFERED="1",  # the launcher shows the log files as they are written
            FERRY_FILES_DIR=str(self.settings.files_dir),
            FERRY_RUN_LOGS=str(self.log_dir),
            FERRY_RUN_STATE=str(self.run_dir),
            FERRY_RUN_REDIS="true" if redis_server else "false",
            FERRY_RUN_REDIS_SERVER=redis_server or "redis-server",
            FERRY_RUN_REDIS_PORT=str(self.redis_port),
            FERRY_RUN_REDIS_DIR=str(self.redis_dir),
            FERRY_RUN_REDIS_MAXMEMORY=self.settings.redis_maxmemory,
        )
        if self.settings.log_level != "debug":
            env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"),
                                                           ROOT_WARNING]))
        return env
