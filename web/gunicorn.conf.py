"""gunicorn settings for Ferry's web process (bind comes from FERRY_HOST/FERRY_PORT)."""

import os

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
