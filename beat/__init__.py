"""The scheduler that emits job groups' backup jobs (Celery beat)."""
