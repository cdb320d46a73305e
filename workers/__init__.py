"""Celery tasks run on every host (volume work on the host's own queue)."""
