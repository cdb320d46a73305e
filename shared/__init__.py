"""blockvault's core: settings, errors, the catalog and the backup engine.

Nothing here knows FastAPI or Celery; `api/`, `workers/` and `beat/` are thin layers over it.
"""
