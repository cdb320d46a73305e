"""``GET /v1/health`` (and ``/zstack/v1/health``): answers without a key while the API runs."""

from __future__ import annotations

from fastapi import APIRouter

from api.schemas import Health

router = APIRouter()


@router.get("/v1/health", response_model=Health)
@router.get("/zstack/v1/health", include_in_schema=False)
def health() -> Health:
    return Health(success=True, status="ok")
