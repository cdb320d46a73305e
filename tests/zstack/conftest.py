"""The real service (API + Celery workers on PostgreSQL and Redis) from tests/service."""

from tests.service.conftest import shared_api, stack

__all__ = ["shared_api", "stack"]
