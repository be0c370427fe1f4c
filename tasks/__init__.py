"""Celery only: the app, the tasks and the worker runtime."""
