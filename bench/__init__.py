"""Benchmarks: scripts, not tests. Each starts the real stack on loopback (redis-server,
Celery workers, gunicorn) beside its peer, measures both in the same run, checks every
output, prints a table of ratios and writes JSON to ``bench/results/``.

``python -m bench`` (``make bench``) runs them all, then ``bench.report``.
"""
