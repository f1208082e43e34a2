"""Exception hierarchy: every error a user can cause or meet, each with a one-line message.

Every class is an ``AudienceSyncError``, and each names one decision its caller makes: a
``LeaseHeldError`` means "busy, skip it or wait", an ``UnknownAudienceError`` "check the
name", a ``LeaseLostError`` "stop without writing"; among delivery outcomes a
``TransientDeliveryError`` may succeed if tried again later, a ``PermanentDeliveryError`` will
not until someone changes something. A bare ``AudienceSyncError`` is a refusal to report as
it is (the operator has to change something first).
"""

from __future__ import annotations

import re

from sqlalchemy.exc import SQLAlchemyError

# libpq's fields after the primary message: DETAIL quotes row values (member ids), LINE,
# QUERY, CONTEXT and STATEMENT quote SQL. HINT is advice and stays.
_QUOTING_FIELD = re.compile(r"\s*(DETAIL|CONTEXT|QUERY|STATEMENT|WHERE|LINE \d+):")
_HINT_FIELD = re.compile(r"\s*HINT:")
_BACKGROUND = re.compile(r"\(Background on this error at: [^)]*\)")


def driver_reason(exc: BaseException) -> str:
    """A database error as one line: the driver's own message (a SQLAlchemy error's ``orig``)
    and its hint, whitespace collapsed, without SQLAlchemy's statement and parameter dump or
    the driver's fields that quote SQL or row values."""
    orig = getattr(exc, "orig", None) or exc
    args: tuple[object, ...] = getattr(orig, "args", ())
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        # PyMySQL: (code, message), shown by str() as a tuple
        return " ".join(f"{args[1]} (MySQL error {args[0]})".split())
    reason = _BACKGROUND.sub("", str(orig).split("[SQL:")[0])
    kept, quoting = [], False
    for line in reason.splitlines():
        if _QUOTING_FIELD.match(line):
            quoting = True
        elif _HINT_FIELD.match(line):
            quoting = False
        if not quoting and line.strip() != "^":
            kept.append(line)
    return " ".join(" ".join(kept).split())


def error_line(exc: BaseException) -> str:
    """Any exception as the one line stored in ``runs.error`` and printed: our own errors as
    they are, database errors by their driver's reason (no SQL, no parameters), anything else
    by its type and first line."""
    if isinstance(exc, AudienceSyncError):
        text = str(exc)
    elif isinstance(exc, SQLAlchemyError):
        # Source errors arrive as SourceError: a bare database error is the state DB's.
        text = f"state database error: {driver_reason(exc)}"
    elif isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{type(exc).__name__}: {exc.strerror}{where}"
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"unexpected {type(exc).__name__}: {first}"
    return " ".join(text.split())


# The pip extra that installs each database driver audience-sync supports, by module name.
DRIVER_EXTRAS = {"psycopg": "audience-sync[postgres]", "pymysql": "audience-sync[mysql]"}
# Drivers without an extra: the extra and URL scheme that replace them.
DRIVER_REPLACEMENTS = {
    "psycopg2": ("audience-sync[postgres]", "postgresql+psycopg://"),
    "MySQLdb": ("audience-sync[mysql]", "mysql+pymysql://"),
}


def missing_driver(exc: ImportError, scheme: str) -> str:
    """One line saying which driver a database URL needs and how to install it."""
    module = exc.name or str(exc)
    if module in DRIVER_EXTRAS:
        return (
            f"the {scheme}:// driver is not installed (no module {module}); "
            f"pip install '{DRIVER_EXTRAS[module]}'"
        )
    if module in DRIVER_REPLACEMENTS:
        extra, replacement = DRIVER_REPLACEMENTS[module]
        return (
            f"the {scheme}:// driver is not installed (no module {module}); "
            f"pip install '{extra}' and write the URL as {replacement}..."
        )
    return (
        f"the {scheme}:// driver is not installed (no module {module}); install the package "
        "that provides it"
    )


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
    """A name or key matches no audience (in the config, or in the state database)."""


class DeliveryError(AudienceSyncError):
    """Base class of delivery outcomes that are not a success."""

    # True when the destination may have applied the batch although we saw a failure.
    outcome_unknown = False


class TransientDeliveryError(DeliveryError):
    """A delivery attempt failed in a way that may succeed later (network, timeout, 429, 5xx)."""

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        outcome_unknown: bool = False,
        connection_failed: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # e.g. a timeout after sending, a reset connection, a lost response
        self.outcome_unknown = outcome_unknown
        # No connection could be made (refused, connect timeout): the destination may be
        # down; enough of these in a row stop delivery to it for the run.
        self.connection_failed = connection_failed


class PermanentDeliveryError(DeliveryError):
    """A delivery attempt failed in a way that will fail again unchanged."""


class RejectedBatchError(PermanentDeliveryError):
    """The destination refused a batch's content (400/413): split it to find the bad message."""


class CredentialsRejectedError(PermanentDeliveryError):
    """The destination refused our credentials (401/403): stop the run."""


class ConfigDriftError(AudienceSyncError):
    """The config disagrees with what the state DB delivered (a likely rename, a destination
    whose endpoint changed): running as configured would leave stale values silently."""
