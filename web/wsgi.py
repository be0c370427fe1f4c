"""gunicorn entry point: ``gunicorn -k gevent web.wsgi:app`` (the gevent worker patches first)."""

import logging

from web import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
