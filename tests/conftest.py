"""Fixtures: a real redis-server, real Celery workers and the real web app (gunicorn with
gevent workers, as in production), all on loopback; the official OpenAI client talks to it."""

from __future__ import annotations

import openai
import pytest

from tests.services import BatchWorker, RedisServer, Service, Web, Worker

# The tests' upload limit, small enough to exceed cheaply.
MAX_FILE_BYTES = 1024 * 1024
# Small chunks and a short visibility timeout, so that a killed batch worker's chunks are
# handed out again within seconds (production: tasks/app.py, config/settings.py).
BATCH_ENV = {"FERRY_BATCH_CHUNK_LINES": "4", "FERRY_BATCH_VISIBILITY_TIMEOUT": "20",
             "FERRY_BATCH_LINE_TIMEOUT": "15", "FERRY_BATCH_CHUNK_RETRIES": "2"}


# Services that tests started and left running, stopped at the end of the session and named
# in the summary (a leftover redis-server or worker would otherwise outlive pytest).
LEFTOVERS: list[Service] = []


@pytest.fixture(scope="session", autouse=True)
def no_leftover_services():
    yield
    LEFTOVERS.extend(s for s in Service.started if s.running)
    for service in LEFTOVERS:
        service.kill()


def pytest_terminal_summary(terminalreporter):
    if LEFTOVERS:
        terminalreporter.write_line("stopped services that tests left running: " + ", ".join(
            f"{s.argv[0].rsplit('/', 1)[-1]} ({s.log})" for s in LEFTOVERS))


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(logs):
    server = RedisServer(logs).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_worker(redis_server, logs):
    worker = Worker("smollm2", redis_server.url, logs).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def synthetic_worker(redis_server, logs):
    worker = Worker("synthetic", redis_server.url, logs).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def embeddings_worker(redis_server, logs):
    worker = Worker("all-minilm", redis_server.url, logs).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def files_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="session")
def web(redis_server, logs, files_dir):
    server = Web(redis_server.url, logs, FERRY_FILES_DIR=str(files_dir),
                 FERRY_MAX_FILE_BYTES=str(MAX_FILE_BYTES), **BATCH_ENV).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def batch_worker(redis_server, logs, files_dir):
    """The batch worker. Tests may kill it and ``start()`` it again: it is one handle."""
    worker = BatchWorker(redis_server.url, logs, FERRY_FILES_DIR=str(files_dir), **BATCH_ENV)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def client(web) -> openai.OpenAI:
    return openai.OpenAI(base_url=web.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def chat(client, smollm2_worker):
    """The official client, with the real SmolLM2 worker running."""
    return client


@pytest.fixture(scope="session")
def tokenize():
    """SmolLM2's tokenizer in the test process (vocabulary only, no weights evaluated):
    text -> token ids, to build token prompts and logit_bias maps."""
    import tomllib

    import llama_cpp

    from config import Registry, load_settings
    from tests.services import TEST_CONFIG

    models = tomllib.loads(TEST_CONFIG.read_text())["models"]
    entry = Registry(load_settings(models=models).models).resolve("smollm2")
    vocab = llama_cpp.Llama(model_path=str(entry.weights_path()), vocab_only=True, verbose=False)
    yield lambda text: vocab.tokenize(text.encode(), add_bos=False, special=True)
    vocab.close()


@pytest.fixture
def embedder(client, embeddings_worker):
    """The official client, with the all-MiniLM-L6-v2 embeddings worker running."""
    return client


@pytest.fixture
def scripted(client, synthetic_worker):
    """The official client, with the synthetic (scripted) worker running."""
    return client
