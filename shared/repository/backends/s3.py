"""The ``s3`` backend: a bucket on AWS S3 or any S3-compatible store (MinIO, Ceph, R2, ...).

``s3://bucket/prefix`` keeps every object under ``prefix/`` in ``bucket``. One botocore client
per backend, shared by every thread (clients are thread-safe); botocore's own retries are off
because :class:`~.retry.RetryingBackend` is the one place that backs off. S3 is strongly
consistent and a PUT is durable when it returns, so ``flush`` has nothing to do, and a PUT is
atomic: readers see the old object or the new one, never part of it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from shared.errors import (
    BackendAuthFailed,
    BackendError,
    BackendForbidden,
    BackendUnavailable,
    BucketNotFound,
    ObjectLocked,
    ObjectNotFound,
    StorageFull,
    UsageError,
)
from shared.forksafe import ForkSafeLock

from .base import Backend, Buffer, ObjectInfo
from .registry import BackendType, Field, register

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 64 * MiB
PART_SIZE = 16 * MiB
MAX_PARTS = 10_000
POOL_SIZE = 16
# missing(): a LIST page answers up to 1000 keys but costs as much as ~12 HEADs (AWS bills
# $0.005 per 1000 LIST against $0.0004 per 1000 HEAD/GET), so a folder is listed only for
# batches at least this large, and listing stops once it answers fewer keys than it costs.
LIST_COST = 12
LIST_MIN_KEYS = 24
LIST_PAGE = 1000  # keys per LIST page: S3's maximum
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
MAX_LOCK_DAYS = 36500.0  # S3 keeps a retention of up to 100 years
LOCKED_FOLDERS = ("chunks/", "manifests/")  # what object lock covers: a backup's own objects

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_AUTH = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AccessDenied",
    "403",
}
_FORBIDDEN = {"AllAccessDisabled", "AccountProblem", "InvalidObjectState", "InvalidBucketState"}
_FULL = {"XMinioStorageFull", "StorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded"}  # 507 too
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "OperationAborted",
    "ConditionalRequestConflict",  # a concurrent conditional write: retrying settles it
}
_NETWORK = (BotoConnectionError, HTTPClientError, ResponseStreamingError, IncompleteReadError)

_client_lock = ForkSafeLock()


@functools.cache
def _session() -> boto3.session.Session:
    return boto3.session.Session()


# nor a session made by another thread (its own locks may have been held at the fork)
os.register_at_fork(after_in_child=_session.cache_clear)


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _new_client(
    *,
    endpoint: str | None,
    region: str,
    access_key: str | None,
    secret_key: str | None,
    connect_timeout: float,
    read_timeout: float,
) -> S3Client:
    """A client from one process-wide session: a session loads botocore's service models
    (tens of ms), and creating clients from one session is not thread-safe, hence the lock."""
    # The body carries a CRC32 checksum header, and every object is checked end to end when
    # read (digest / AEAD): hashing each 4 MiB body again with SHA-256 for the signature, as
    # botocore does on plain http, would only cost CPU. S3-compatible servers seldom resolve
    # virtual-host bucket names, so a custom endpoint is addressed path-style.
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},  # RetryingBackend is the one retry
        max_pool_connections=POOL_SIZE,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        tcp_keepalive=True,
        s3={"payload_signing_enabled": False, "addressing_style": "path" if endpoint else "auto"},
    )
    with _client_lock:
        return _session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )


class S3Backend(Backend):
    """Objects as keys ``<prefix>/<key>`` in one bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        lock_mode: str | None = None,
        lock_days: float = 0.0,
    ) -> None:
        if not bucket:
            raise UsageError(detail="an s3 location names a bucket: s3://bucket/prefix")
        if bool(access_key) != bool(secret_key):
            raise UsageError(detail="give both accessKey and secretKey, or neither")
        if (lock_mode is None) != (lock_days <= 0):
            raise UsageError(detail="object lock takes objectLockMode and objectLockDays (over 0), or neither")
        if lock_mode is not None and lock_mode not in LOCK_MODES:
            raise UsageError(detail=f"objectLockMode must be {' or '.join(LOCK_MODES)}, got {lock_mode!r}")
        self.lock_mode = lock_mode
        self.lock_seconds = lock_days * 86400.0
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}"
        self.endpoint = endpoint
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._secret = secret_key  # only to scrub it from any message, should one echo it
        self._client = _new_client(
            endpoint=endpoint,
            region=region,
            access_key=access_key,
            secret_key=secret_key,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._conditional = True  # does the server honour If-None-Match on PUT?
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def from_url(cls, location: str, options: Mapping[str, str | None]) -> S3Backend:
        """``s3://bucket/prefix`` with the ``endpoint`` (default AWS), ``region`` (default
        us-east-1), ``accessKey`` and ``secretKey`` of ``options``, and for a bucket with Object
        Lock enabled ``objectLockMode`` (GOVERNANCE or COMPLIANCE) and ``objectLockDays`` (the
        retention of each chunk and manifest written; a decimal number). The process's settings
        (``BLOCKVAULT_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL(_S3)``, ``AWS_DEFAULT_REGION``) are
        given there by the caller: this reads no environment. Without keys, botocore's own
        credential chain (``AWS_ACCESS_KEY_ID``, ``~/.aws``, an instance role) applies."""
        parsed = urlparse(location)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise UsageError(detail=f"{location!r} is not an s3://bucket/prefix location")
        days = options.get("objectLockDays") or "0"
        try:
            lock_days = float(days)
        except ValueError:
            raise UsageError(detail=f"objectLockDays must be a number of days, got {days!r}") from None
        if not math.isfinite(lock_days) or not 0 <= lock_days <= MAX_LOCK_DAYS:
            raise UsageError(detail=f"objectLockDays must be a positive number of days up to 36500, got {days!r}")
        return cls(
            parsed.netloc,
            parsed.path,
            endpoint=options.get("endpoint") or None,
            region=options.get("region") or "us-east-1",
            access_key=options.get("accessKey") or None,
            secret_key=options.get("secretKey") or None,
            lock_mode=options.get("objectLockMode") or None,
            lock_days=lock_days,
        )

    # -- errors -----------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _error(self, exc: Exception, key: str) -> BackendError:
        """Our error for a botocore failure on ``key``."""
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = self._scrub(f"{key}: {code} {error.get('Message') or ''}".rstrip())
            if code == "NoSuchBucket":
                return BucketNotFound(location=self.location, bucket=self.bucket)
            if code in _NOT_FOUND:
                return ObjectNotFound(location=self.location, key=key)
            if code in _AUTH:
                return BackendAuthFailed(location=self.location, detail=detail)
            if code in _FORBIDDEN:
                return BackendForbidden(location=self.location, detail=detail)
            if code in _FULL or status == 507:
                return StorageFull(location=self.location, detail=detail)
            if code in _TRANSIENT or status >= 500 or status == 429:
                return BackendUnavailable(location=self.location, detail=detail)
            return BackendError(location=self.location, detail=detail)
        if isinstance(exc, _NETWORK):
            return BackendUnavailable(location=self.location, detail=self._scrub(f"{key}: {exc}"))
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return BackendAuthFailed(
                location=self.location, detail="no usable credentials: set accessKey and secretKey"
            )
        return BackendError(location=self.location, detail=self._scrub(f"{key}: {exc}"))

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from None

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(location=self.location, detail=f"invalid key {key!r}")
        return self.prefix + key

    # -- objects ----------------------------------------------------------------------------
    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        name = self._key(key)
        # botocore sends bytes and bytearray as they are (the stubs say bytes); a view it
        # refuses, so that rare case is copied.
        body = cast(bytes, data) if isinstance(data, (bytes, bytearray)) else bytes(data)
        if not overwrite and not self._conditional and self.exists(key):
            # A server without conditional writes: HEAD then PUT. Two writers can both see
            # nothing and both write; repository objects written this way are content-named
            # (same key, same bytes) or written once by init, so the loser's PUT is harmless.
            return
        conditional = not overwrite and self._conditional
        lock = self._lock_params(key)
        try:
            if len(body) > self.multipart_threshold:
                self._put_multipart(name, body, conditional, lock)
            elif conditional:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*", **lock)
            else:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body, **lock)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code") or "")
            if conditional and code == "PreconditionFailed":
                return  # already there: overwrite=False keeps it, and put succeeds
            if conditional and code == "NotImplemented":
                log.info("s3.no_conditional_writes location=%s: falling back to HEAD then PUT", self.location)
                self._conditional = False
                return self.put(key, body, overwrite=overwrite)
            raise self._error(exc, key) from None
        except BotoCoreError as exc:
            raise self._error(exc, key) from None

    def _put_multipart(self, name: str, body: bytes, conditional: bool, lock: dict[str, Any]) -> None:
        """Upload ``body`` in parts; the upload is aborted if any step fails, so no parts
        linger (a bucket lifecycle rule AbortIncompleteMultipartUpload catches a killed one)."""
        part_size = max(self.part_size, math.ceil(len(body) / MAX_PARTS))
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=name, **lock)["UploadId"]
        try:
            view = memoryview(body)
            parts: list[CompletedPartTypeDef] = []
            for number, start in enumerate(range(0, len(body), part_size), 1):
                # botocore takes bytes, not views: one part-sized copy at a time (objects this
                # large are rare: repository chunks are a few MiB and go in one PUT).
                chunk = view[start : start + part_size].tobytes()
                etag = self._client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=chunk
                )["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
            if conditional:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
                )
            else:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("s3.multipart_abort_failed key=%s upload=%s: %s", name, upload_id, self._error(exc, name))
            raise

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        name = self._key(key)
        if length is not None and length <= 0:
            self.stat(key)  # still ObjectNotFound for a missing object
            return b""
        try:
            if offset == 0 and length is None:
                response = self._client.get_object(Bucket=self.bucket, Key=name)
            else:
                end = "" if length is None else str(offset + length - 1)
                response = self._client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={offset}-{end}")
            return response["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # the object exists, the range starts at or past its end
            raise self._error(exc, key) from None
        except BotoCoreError as exc:
            raise self._error(exc, key) from None

    def stat(self, key: str) -> ObjectInfo:
        name = self._key(key)
        head = self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=name))
        return ObjectInfo(key=key, size=head["ContentLength"], mtime=head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        name = self._key(key)  # S3 answers 204 for a missing key too: idempotent as it is
        if self.lock_mode is None:
            self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=name))
            return
        # A bucket with Object Lock is versioned: a plain DELETE would only hide the object
        # behind a delete marker (and succeed even while it is locked). Every version goes, and
        # a locked one is refused before anything is touched.
        until = self.locked_until(key) if key.startswith(LOCKED_FOLDERS) else None
        if until is not None:
            raise ObjectLocked(location=self.location, key=key, until=_iso(until))
        for version in self._versions(name):
            try:
                self._client.delete_object(Bucket=self.bucket, Key=name, VersionId=version)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) == "AccessDenied":
                    raise ObjectLocked(location=self.location, key=key, until="a date S3 keeps") from None
                raise self._error(exc, key) from None
            except BotoCoreError as exc:
                raise self._error(exc, key) from None

    # -- object lock ------------------------------------------------------------------------
    def _lock_params(self, key: str) -> dict[str, Any]:
        """The put parameters that lock a new chunk or manifest for ``lock_seconds``."""
        if self.lock_mode is None or not key.startswith(LOCKED_FOLDERS):
            return {}
        until = datetime.fromtimestamp(time.time() + self.lock_seconds, UTC)
        return {"ObjectLockMode": self.lock_mode, "ObjectLockRetainUntilDate": until}

    def _versions(self, name: str) -> list[str]:
        """The version ids of ``name`` (delete markers too)."""
        found: list[str] = []
        pages = self._client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=name)
        try:
            for page in pages:
                for item in (*page.get("Versions", ()), *page.get("DeleteMarkers", ())):
                    if item["Key"] == name and item.get("VersionId"):
                        found.append(str(item["VersionId"]))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, name) from None
        return found

    def locked_until(self, key: str) -> float | None:
        """From the object's HEAD: its retain-until date while that is in the future."""
        if self.lock_mode is None:
            return None
        name = self._key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, key)
            if isinstance(error, ObjectNotFound):
                return None
            raise error from None
        until = head.get("ObjectLockRetainUntilDate")
        if until is None or until.timestamp() <= time.time():
            return None
        return float(until.timestamp())

    def extend_lock(self, key: str, until: float) -> None:
        if self.lock_mode is None:
            return
        name = self._key(key)
        date = datetime.fromtimestamp(until, UTC)
        self._call(
            key,
            lambda: self._client.put_object_retention(
                Bucket=self.bucket, Key=name, Retention={"Mode": cast(Any, self.lock_mode), "RetainUntilDate": date}
            ),
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        strip = len(self.prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield ObjectInfo(key=item["Key"][strip:], size=item["Size"], mtime=item["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix or "(list)") from None

    # -- which keys are missing -------------------------------------------------------------
    def missing(self, keys: Iterable[str]) -> set[str]:
        """S3 has no batch existence call. Keys are grouped by folder; a folder asked about
        for at least LIST_MIN_KEYS keys is listed over just the range of those keys (one LIST
        page answers up to 1000 of them: a sync of 256 chunks into an empty or fresh folder
        costs one request), stopping as soon as listing answers fewer keys per page than the
        LIST_COST HEADs a page costs; every other key gets a HEAD, several in parallel."""
        folders: dict[str, list[str]] = {}
        for key in set(keys):
            folder, slash, _ = self._key(key).rpartition("/")
            folders.setdefault(folder + slash, []).append(key)
        absent: set[str] = set()
        to_head: list[str] = []
        for group in folders.values():
            if len(group) >= LIST_MIN_KEYS:
                absent_here, unresolved = self._missing_by_list(sorted(group))
                absent |= absent_here
                to_head.extend(unresolved)
            else:
                to_head.extend(group)
        if len(to_head) == 1:
            return absent | ({to_head[0]} if not self._head_exists(to_head[0]) else set())
        if to_head:
            results = self._executor().map(self._head_exists, to_head)
            absent.update(key for key, there in zip(to_head, results, strict=True) if not there)
        return absent

    def _missing_by_list(self, group: Sequence[str]) -> tuple[set[str], Sequence[str]]:
        """For sorted keys of one folder: (those listing shows absent, those left to HEAD)."""
        names = [self._key(key) for key in group]
        folder, slash, _ = names[0].rpartition("/")
        prefix = folder + slash  # "" for keys at the top of a bucket without prefix
        # StartAfter is exclusive: the first name less one character sorts just before it.
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, StartAfter=names[0][:-1], PaginationConfig={"PageSize": LIST_PAGE}
        )
        absent: set[str] = set()
        present: set[str] = set()
        done = 0  # names[:done] are answered
        try:
            for page in pages:
                present.update(item["Key"] for item in page.get("Contents", ()))
                last = page["Contents"][-1]["Key"] if page.get("Contents") else None
                final = not page.get("IsTruncated")
                before = done
                while done < len(names) and (final or (last is not None and names[done] <= last)):
                    if names[done] not in present:
                        absent.add(group[done])
                    done += 1
                if done == len(names) or done - before < LIST_COST:
                    break  # answered, or listing now costs more than the HEADs it saves
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix) from None
        return absent, group[done:]

    def _head_exists(self, key: str) -> bool:
        name = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, key)
            if isinstance(error, ObjectNotFound):
                return False
            raise error from None
        return True

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="s3-head")
            return self._pool

    # -- the store --------------------------------------------------------------------------
    def create(self) -> None:
        """Check that the bucket exists and the credentials reach it; buckets are made by
        whoever owns the account (with its region, policy and lifecycle rules), never here.
        With object lock, the bucket must have Object Lock enabled."""
        self._head_bucket()
        if self.lock_mode is not None:
            try:
                config = self._client.get_object_lock_configuration(Bucket=self.bucket)
                enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) != "ObjectLockConfigurationNotFoundError":
                    raise self._error(exc, "(bucket)") from None
                enabled = False
            except BotoCoreError as exc:
                raise self._error(exc, "(bucket)") from None
            if not enabled:
                raise UsageError(detail=f"bucket {self.bucket} has no Object Lock enabled: objectLockMode refused")

    def capacity(self) -> tuple[int, int] | None:
        """None (a bucket has no size limit) after a HEAD of the bucket: the health check
        fails like any call when the bucket, the credentials or the server are wrong."""
        self._head_bucket()
        return None

    def _head_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                raise BucketNotFound(location=self.location, bucket=self.bucket) from None
            raise self._error(exc, "(bucket)") from None
        except BotoCoreError as exc:
            raise self._error(exc, "(bucket)") from None

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._client.close()


ENTRY = register(
    BackendType(
        "PublicCloud",
        ("s3",),
        S3Backend.from_url,
        fields=(
            Field(
                "endpoint",
                help="S3-compatible URL.",
                envvar="BLOCKVAULT_S3_ENDPOINT",
                setting="s3_endpoint",
                identity=True,
            ),
            Field("region", help="its region.", setting="s3_region"),
            Field("accessKey", help="the access key.", secret=True, envvar="AWS_ACCESS_KEY_ID"),
            Field("secretKey", help="the secret key.", secret=True, envvar="AWS_SECRET_ACCESS_KEY"),
            Field("objectLockMode", help="GOVERNANCE or COMPLIANCE: a bucket with Object Lock enabled."),
            Field("objectLockDays", help="days each chunk and manifest stays locked (decimal)."),
        ),
        encrypted=True,
        url_form="s3://bucket/prefix",
    )
)
