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

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        super().__init__(self.message)

    @property
    def message(self) -> str:
        template = (type(self).__doc__ or "{detail}").strip().splitlines()[0]
        try:
            return template.format(**self.fields)
        except (KeyError, IndexError):
            return f"{template} {self.fields}"

    def __str__(self) -> str:
        return self.message


class UsageError(BlockvaultError):
    """{detail}"""

    exit_code = 2


class IntegrityError(BlockvaultError):
    """integrity error: {detail}"""


class RepositoryError(BlockvaultError):
    """repository {location}: {detail}"""


class RepositoryNotFound(RepositoryError):
    """no repository at {location}"""

    exit_code = 2


class RepositoryExists(RepositoryError):
    """a repository already exists at {location}"""

    exit_code = 2


class WrongPassphrase(RepositoryError):
    """wrong passphrase for the repository at {location}"""

    exit_code = 2


class PassphraseRequired(RepositoryError):
    """the repository at {location} is encrypted: set BLOCKVAULT_PASSPHRASE"""

    exit_code = 2


class RepositoryLocked(RepositoryError):
    """repository {location} is busy: {detail}"""


class BackupNotFound(RepositoryError):
    """no backup {backup} in the repository at {location}"""

    exit_code = 2


class VolumeError(BlockvaultError):
    """volume {path}: {detail}"""

    exit_code = 2


class TargetExists(VolumeError):
    """restore target {path} exists: choose a new path"""


class BackendError(BlockvaultError):
    """storage backend {location}: {detail}"""


class ObjectNotFound(BackendError):
    """storage backend {location}: no object {key}"""


class BackendUnavailable(BackendError):
    """storage backend {location} is unavailable: {detail}"""

    retryable = True
