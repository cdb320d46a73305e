"""The real service (API + Celery workers on PostgreSQL and Redis) from tests/service."""

from tests.service.conftest import stack

__all__ = ["stack"]
