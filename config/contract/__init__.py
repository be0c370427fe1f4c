"""The web <-> worker contract: what a job asks (``job``), the events a worker publishes
(``events``) and the Redis and Celery names both sides use (``protocol``).

Here, below every other package, so that the web (``web/``, ``tasks/core``), the Celery
workers (``tasks/``) and the backends (``models/``) import it without importing each other.
It imports nothing of Ferry's but ``config.errors`` (``events.failed``), keeping ``config`` a
leaf (the import-linter contracts in ``pyproject.toml``).
"""
