"""gunicorn settings for Ferry's web process (bind comes from FERRY_HOST/FERRY_PORT)."""

import gc
import os
import shutil
import tempfile

# Metrics from every worker process are aggregated through files in this directory.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ferry-metrics-"))

bind = f"{os.environ.get('FERRY_HOST', '127.0.0.1')}:{os.environ.get('FERRY_PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("FERRY_WEB_WORKERS", "1"))
# Open streams per web worker: gevent greenlets are cheap, the OS file limit is the bound.
worker_connections = 2000
# Streams can run long; gunicorn's timeout is for hung workers, not slow requests.
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = "-"
loglevel = os.environ.get("FERRY_LOG_LEVEL", "info")


def on_starting(server):
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def post_worker_init(worker):
    # The app is loaded and lives as long as the process: freezing it takes its objects out
    # of the collector's sight. A full collection over them took ~30 ms, a pause that every
    # request and stream in this process would wait through; it now scans only what
    # requests allocate.
    gc.freeze()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
