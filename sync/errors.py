"""Exception hierarchy: every error a user can cause or meet, each with a one-line message.

Branches follow what a caller must do: a ``TransientError`` may succeed if tried again later,
a ``PermanentError`` will not until someone changes something.
"""

from __future__ import annotations


def driver_reason(exc: BaseException) -> str:
    """A database error as one line: the driver's own message (a SQLAlchemy error's ``orig``),
    whitespace collapsed, without SQLAlchemy's statement and parameter dump."""
    reason = str(getattr(exc, "orig", None) or exc)
    return " ".join(reason.split("[SQL:")[0].split())


class AudienceSyncError(Exception):
    """Base class of every error audience-sync raises on purpose."""


class ConfigError(AudienceSyncError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        if len(problems) == 1:
            message = f"{path}: {problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in problems)
            message = f"{path}: {len(problems)} problems:\n{listed}"
        super().__init__(message)


class StateError(AudienceSyncError):
    """The state database cannot be used as it is."""


class StateDatabaseMissingError(StateError):
    """The state database file does not exist yet."""


class SchemaOutOfDateError(StateError):
    """The state database schema is older than this version of audience-sync expects."""


class SchemaTooNewError(StateError):
    """The state database was migrated by a newer version of audience-sync."""


class SourceError(AudienceSyncError):
    """An audience's source database could not be reached or its query failed."""


class LeaseHeldError(AudienceSyncError):
    """Another process holds the lease of an audience."""


class RunInterruptedError(AudienceSyncError):
    """The process was asked to stop while the run was computing its snapshot."""


class LeaseLostError(AudienceSyncError):
    """Our lease expired and another process took the audience over."""


class UnknownAudienceError(AudienceSyncError):
    """A name or key given on the command line matches no configured audience."""


class DeliveryError(AudienceSyncError):
    """Base class of delivery outcomes that are not a success."""

    # True when the destination may have applied the batch although we saw a failure.
    outcome_unknown = False


class TransientDeliveryError(DeliveryError):
    """A delivery attempt failed in a way that may succeed later (network, timeout, 429, 5xx)."""

    def __init__(
        self, message: str, retry_after: float | None = None, *, outcome_unknown: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # e.g. a timeout after sending, a reset connection, a lost response
        self.outcome_unknown = outcome_unknown


class PermanentDeliveryError(DeliveryError):
    """A delivery attempt failed in a way that will fail again unchanged."""


class RejectedBatchError(PermanentDeliveryError):
    """The destination refused a batch's content (400/413): split it to find the bad message."""


class CredentialsRejectedError(PermanentDeliveryError):
    """The destination refused our credentials (401/403): stop the run."""


class ConfigDriftError(AudienceSyncError):
    """The config disagrees with what the state DB delivered (a likely rename, a destination
    whose endpoint changed): running as configured would leave stale values silently."""
