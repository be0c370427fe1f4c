"""gunicorn entry point: ``gunicorn -k gevent web.wsgi:app`` (the gevent worker patches first)."""

from web import create_app

app = create_app()
