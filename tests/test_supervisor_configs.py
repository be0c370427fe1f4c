"""The two supervisord configs, read by supervisord's own parser (no process started): the
one `make run` runs, and the deployment example, which must stay the Procfile's processes."""

from __future__ import annotations

import getpass
import shlex

from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

from tasks.launch.plan import DEFAULT_CONF, Plan
from config import load_settings
from tests.services import ROOT


def parse(path, monkeypatch, env: dict[str, str] | None = None) -> dict:
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    options = ServerOptions()
    section = options.read_config(str(path))
    return {p.name: p for group in section.process_group_configs
            for p in group.process_configs}


def test_make_run_config_restarts_every_process_and_bounds_redis(tmp_path, monkeypatch):
    plan = Plan.read(load_settings(files_dir=tmp_path / "files"))
    for path in (plan.log_dir, plan.run_dir):
        path.mkdir(parents=True)
    programs = parse(DEFAULT_CONF, monkeypatch, plan.environment("/usr/bin/redis-server"))
    assert set(programs) == {"redis", "web", "smollm2", "all-minilm", "batch", "webhooks"}
    assert plan.models == ("smollm2", "all-minilm")
    for p in programs.values():
        assert p.autorestart is RestartUnconditionally, p.name
        assert p.stopasgroup and p.killasgroup, p.name
        assert p.startretries >= 10 and p.redirect_stderr, p.name
        assert p.stdout_logfile == str(plan.log_path(p.name))
    redis = shlex.split(programs["redis"].command)
    option = {flag: redis[i + 1] for i, flag in enumerate(redis) if flag.startswith("--")}
    assert option["--appendonly"] == "yes" and option["--appendfsync"] == "everysec"
    assert option["--dir"] == str(tmp_path / "redis")
    assert option["--maxmemory"] == "2gb" and option["--maxmemory-policy"] == "noeviction"
    assert programs["smollm2"].command == "python -m tasks.worker smollm2"
    # Redis is left out when one already answers at FERRY_REDIS_URL.
    assert parse(DEFAULT_CONF, monkeypatch, plan.environment(None))["redis"].autostart is False


def test_deployment_config_runs_the_procfile(tmp_path, monkeypatch):
    """config/supervisord.gpu.conf runs exactly the Procfile's lines, each restarted."""
    text = (ROOT / "config" / "supervisord.gpu.conf").read_text()
    conf = tmp_path / "ferry.conf"
    (tmp_path / "log").mkdir()
    conf.write_text(text.replace("user=ferry", f"user={getpass.getuser()}")
                    .replace("/var/log/ferry/", f"{tmp_path}/log/"))
    main = tmp_path / "supervisord.conf"
    main.write_text(f"[supervisord]\n[include]\nfiles={conf}\n")
    programs = parse(main, monkeypatch)

    procfile = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, command = line.partition(": ")
            words = shlex.split(command)
            env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=")[0].isupper())
            procfile[name] = (env, [w for w in words if w.split("=")[0] not in env])
    assert set(programs) == set(procfile)
    for name, (env, argv) in procfile.items():
        program = programs[name]
        got = shlex.split(program.command)
        assert got[0].removeprefix("/opt/ferry/.venv/bin/") == argv[0], name
        assert got[1:] == argv[1:], name
        assert env.items() <= program.environment.items(), name
        assert "FERRY_REDIS_URL" in program.environment, name
        assert program.autorestart is RestartUnconditionally and program.stopasgroup, name
