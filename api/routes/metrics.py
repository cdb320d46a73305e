"""``GET /metrics``: Prometheus text, read from the catalog and the broker when scraped
(:mod:`shared.metrics`).

It needs an admin API key like the rest of ``/v1`` (Prometheus: ``authorization:
credentials_file``), unless ``BLOCKVAULT_METRICS_PUBLIC=true``. The key in
``BLOCKVAULT_ADMIN_API_KEY`` is checked without the catalog, so a scrape still answers
(``blockvault_catalog_up 0``) while the catalog is down; any other admin key is checked in the
catalog. A client locked out by its failed keys gets 429 here too. Not in the OpenAPI schema:
it answers text, not the JSON envelope.
"""

from __future__ import annotations

import hmac
import math

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from api.auth import TooManyFailures
from api.deps import get_caller
from shared.catalog import db
from shared.config import get_settings
from shared.errors import Forbidden
from shared.ratelimit import FailureWindow

router = APIRouter()


def _is_admin_key(header: str | None) -> bool:
    """Whether ``header`` presents the configured ``BLOCKVAULT_ADMIN_API_KEY`` (constant time)."""
    configured = get_settings().admin_api_key
    scheme, _, key = (header or "").partition(" ")
    key = key.strip()
    if configured is None or not key or scheme.lower() not in ("bearer", "oauth"):
        return False
    return hmac.compare_digest(key.encode(), configured.get_secret_value().encode())


def authorize(request: Request) -> None:
    """Public when configured; else the configured admin key, or an admin key in the catalog."""
    if get_settings().metrics_public:
        return
    failures: FailureWindow = request.app.state.auth_failures
    client = request.client.host if request.client else "unknown"
    wait = failures.retry_after(client)
    if wait is not None:
        raise TooManyFailures(client=client, retry_after=max(1, math.ceil(wait)))
    if _is_admin_key(request.headers.get("authorization")):
        return
    with db.session() as session:
        caller = get_caller(request, session)
    if not caller.admin:
        raise Forbidden(detail="metrics need an admin API key")


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    authorize(request)
    encode, content_type = choose_encoder(request.headers.get("accept", ""))  # what the scraper asks for
    return Response(encode(request.app.state.metrics_registry), headers={"Content-Type": content_type})
