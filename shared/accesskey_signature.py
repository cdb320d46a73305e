"""How ZStack's SDKs sign a request with an access key, for both ends: the client
(:mod:`api.client`) signs, the API (:mod:`shared.accesskeys`) checks. Standard library only:
the command line's REST client loads it without the catalog (SQLAlchemy and the ORM models were
0.5 of a REST command's 0.75 CPU s of imports when it came from :mod:`shared.accesskeys`).

``Authorization: ZStack <AccessKeyID>:<signature>`` with a ``Date`` header, the signature the
base64 HMAC-SHA1, under the key's secret, of ``"<METHOD>\\n<Date header, as sent>\\n<path>"``
(the Go SDK's ``getAccessKeyHeader`` in ``pkg/client/http_client.go``), where the path is the
request's path after the ``/zstack`` context path and without its query string.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

ZSTACK_CONTEXT = "/zstack"


def signature(secret: str, method: str, date: str, path: str) -> str:
    """What a ZStack SDK sends after ``<AccessKeyID>:`` for this request."""
    text = f"{method}\n{date}\n{path}".encode()
    return base64.b64encode(hmac.new(secret.encode(), text, hashlib.sha1).digest()).decode()


def signed_path(path: str) -> str:
    """The path a ZStack SDK signs: the request's, after the ``/zstack`` context path."""
    if path == ZSTACK_CONTEXT or path.startswith(ZSTACK_CONTEXT + "/"):
        return path[len(ZSTACK_CONTEXT) :]
    return path
