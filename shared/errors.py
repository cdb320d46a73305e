"""blockvault's error hierarchy.

Each class's docstring is its message template; ``str(error)`` fills it from the keyword
arguments given at construction, so messages stay one line and consistent everywhere.
``exit_code`` is what the CLI exits with; ``retryable`` tells the retry wrapper whether trying
again may help (restic's IsPermanentError, the other way round).
"""

from __future__ import annotations

from typing import Any, ClassVar


class BlockvaultError(Exception):
    """blockvault error: {detail}"""

    exit_code: ClassVar[int] = 1
    retryable: ClassVar[bool] = False
    code: ClassVar[str] = "INTERNAL_ERROR"
    http_status: ClassVar[int] = 500

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        self.where = ""
        super().__init__(self.message)

    @property
    def message(self) -> str:
        template = (type(self).__doc__ or "{detail}").strip().splitlines()[0]
        try:
            return self.where + template.format(**self.fields)
        except (KeyError, IndexError):
            return f"{self.where}{template} {self.fields}"

    def at(self, where: str) -> BlockvaultError:
        """This error, its message saying where it happened first (``volumes[3]: ...``)."""
        self.where = f"{where}: "
        self.args = (self.message,)
        return self

    def __str__(self) -> str:
        return self.message


class UsageError(BlockvaultError):
    """{detail}"""

    code = "INVALID_ARGUMENT"
    http_status = 400

    exit_code = 2


class IntegrityError(BlockvaultError):
    """integrity error: {detail}"""

    code = "INTEGRITY_ERROR"
    http_status = 500


class RepositoryError(BlockvaultError):
    """repository {location}: {detail}"""

    code = "STORAGE_ERROR"
    http_status = 500


class RepositoryNotFound(RepositoryError):
    """no repository at {location}"""

    code = "STORAGE_NOT_FOUND"
    http_status = 409

    exit_code = 2


class RepositoryExists(RepositoryError):
    """a repository already exists at {location}"""

    exit_code = 2


class WrongPassphrase(RepositoryError):
    """wrong passphrase for the repository at {location}"""

    code = "WRONG_PASSPHRASE"
    http_status = 409

    exit_code = 2


class PassphraseRequired(RepositoryError):
    """the repository at {location} is encrypted: set BLOCKVAULT_PASSPHRASE"""

    code = "PASSPHRASE_REQUIRED"
    http_status = 409

    exit_code = 2


class RepositoryLocked(RepositoryError):
    """repository {location} is busy: {detail}"""

    code = "STORAGE_BUSY"
    http_status = 409


class MalformedLock(BlockvaultError):
    """lock {key} is malformed: {detail}"""

    code = "INVALID_ARGUMENT"
    http_status = 400


class BackupNotFound(RepositoryError):
    """no backup {backup} in the repository at {location}"""

    code = "BACKUP_NOT_FOUND"
    http_status = 404

    exit_code = 2


class VolumeError(BlockvaultError):
    """volume {path}: {detail}"""

    code = "VOLUME_ERROR"
    http_status = 409

    exit_code = 2


class TargetExists(VolumeError):
    """restore target {path} exists: choose a new path"""

    code = "TARGET_EXISTS"
    http_status = 409


class PathNotAllowed(BlockvaultError):
    """{what} {path} is not allowed: {detail}"""

    code = "PATH_NOT_ALLOWED"
    http_status = 400
    exit_code = 2


class MonitorError(BlockvaultError):
    """QEMU monitor {socket}: {detail}"""

    code = "VM_MONITOR_ERROR"
    http_status = 409

    exit_code = 2


class GuestAgentError(BlockvaultError):
    """guest agent {socket}: {detail}"""

    code = "GUEST_AGENT_ERROR"
    http_status = 409

    exit_code = 2


class BackendError(BlockvaultError):
    """storage backend {location}: {detail}"""

    code = "STORAGE_ERROR"
    http_status = 502


class ObjectNotFound(BackendError):
    """storage backend {location}: no object {key}"""

    code = "STORAGE_OBJECT_MISSING"
    http_status = 502


class BackendUnavailable(BackendError):
    """storage backend {location} is unavailable: {detail}"""

    code = "STORAGE_UNAVAILABLE"
    http_status = 503

    retryable = True


class StorageFull(BackendError):
    """storage backend {location} is full: {detail}"""

    # ENOSPC/EDQUOT from a folder or a storage-server's disk, 507 from S3 or the server: never
    # retried (the space does not come back by itself), and a master that is full fails over
    code = "STORAGE_FULL"
    http_status = 507


class BackendAuthFailed(BackendError):
    """storage backend {location} rejected the credentials: {detail}"""

    code = "STORAGE_AUTH_FAILED"
    http_status = 400


class BackendForbidden(BackendError):
    """storage backend {location} refused: {detail}"""

    code = "STORAGE_FORBIDDEN"
    http_status = 409


class BucketNotFound(BackendError):
    """storage backend {location}: bucket {bucket} does not exist"""

    code = "STORAGE_BUCKET_MISSING"
    http_status = 400


class CredentialsUnreadable(BlockvaultError):
    """backup storage {name} ({uuid}): credentials sealed under another secret; re-enter them (updateBackupStorage)

    The server secret (BLOCKVAULT_SECRET_KEY or <data dir>/secret.key) is not the one they were sealed
    under, as after restoring a catalog onto another deployment: updateBackupStorage with its token,
    accessKey, secretKey and encryptionPassphrase seals them again.
    """

    code = "CREDENTIALS_UNREADABLE"
    http_status = 409


class DatabaseDumpError(BlockvaultError):
    """database {database}: {detail}"""

    code = "DATABASE_DUMP_FAILED"
    http_status = 500


class CatalogUnavailable(BlockvaultError):
    """the catalog database is unavailable: {detail}"""

    code = "DATABASE_UNAVAILABLE"
    http_status = 503

    retryable = True


class NotFound(BlockvaultError):
    """no {resource} {uuid}"""

    code = "NOT_FOUND"
    http_status = 404

    exit_code = 2


class Conflict(BlockvaultError):
    """{detail}"""

    code = "CONFLICT"
    http_status = 409


class BackupProtected(Conflict):
    """{what} {uuid} is protected: {action} refused until an admin unprotects it"""

    code = "BACKUP_PROTECTED"


class BackupLocked(Conflict):
    """{what} {uuid} is locked on {location} until {until} (object lock): {action} refused"""

    code = "BACKUP_LOCKED"


class ObjectLocked(BackendError):
    """{location}: {key} is under object lock until {until}: not deleted"""

    code = "BACKUP_LOCKED"
    http_status = 409


class QuotaExceeded(Conflict):
    """project {project}: quota {quota} is {limit}, {used} used: {action} refused"""

    code = "QUOTA_EXCEEDED"


def require(params: dict[str, object], *names: str) -> None:
    """InvalidArgument naming every one of ``names`` that ``params`` lacks (or has empty)."""
    missing = [name for name in names if not params.get(name)]
    if missing:
        raise InvalidArgument(detail=f"missing required params: {', '.join(missing)}")


class InvalidArgument(UsageError):
    """{detail}"""


class HostDisconnected(BlockvaultError):
    """host {host} is disconnected: {detail}"""

    code = "HOST_DISCONNECTED"
    http_status = 409


class Unauthorized(BlockvaultError):
    """{detail}"""

    code = "UNAUTHORIZED"
    http_status = 401


class Forbidden(BlockvaultError):
    """{detail}"""

    code = "FORBIDDEN"
    http_status = 403


class NoFilesystem(BlockvaultError):
    """{what}: {detail}"""

    code = "NO_FILESYSTEM"
    http_status = 422


class FileNotInBackup(NotFound):
    """no file {path} in {what}"""


class FilesTimeout(BlockvaultError):
    """{what}: {detail}"""

    code = "TIMEOUT"
    http_status = 503
    retryable = True


class StreamFailed(BlockvaultError):
    """instant restore of {what}: {detail}"""

    code = "STREAM_FAILED"
    http_status = 500


class DeliveryFailed(BlockvaultError):
    """notification target {target}: {detail}"""

    code = "NOTIFICATION_DELIVERY_FAILED"
    http_status = 503
    retryable = True


class ManagedByLibvirt(BlockvaultError):
    """{what} is managed by libvirt on its host: {detail}"""

    code = "MANAGED_BY_LIBVIRT"
    http_status = 409


class LibvirtError(BlockvaultError):
    """libvirt {uri}: {detail}"""

    code = "LIBVIRT_ERROR"
    http_status = 503
    exit_code = 2
