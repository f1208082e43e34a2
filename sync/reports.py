"""What a run was asked to do, and what it did."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sync.state.tables import RunStatus, RunTrigger

# Exit codes of `sync` and `run --once` (README "Exit codes"). 2 is click's own code for a
# usage error; a config error is one too (nothing ran).
EXIT_OK = 0  # every planned change was acknowledged
EXIT_FAILED = 1  # a run failed, was guarded or found its audience busy
EXIT_USAGE = 2  # usage or config error
EXIT_PARTIAL = 3  # something was left pending, rejected or failed, or a run was interrupted

# Outcomes that left planned changes unacknowledged without failing the run.
PARTIAL_STATUSES = ("partial", "interrupted")


@dataclass(frozen=True)
class RunOptions:
    """How to run: a normal delta sync unless told otherwise."""

    full: bool = False
    include_exited: bool = False
    dry_run: bool = False
    force: bool = False
    trigger: RunTrigger = "manual"
    wait: float = 0.0
    # False: compute and plan, commit, and leave the rows pending (benchmarks measure the
    # phases apart; the next run delivers them).
    deliver: bool = True


@dataclass
class DestinationReport:
    """One destination's part of a run: the planner creates it with what it changed, delivery
    adds what it sent, the engine stores it (``run_deliveries``) and the CLI prints it."""

    destination: str
    added: int = 0
    removed: int = 0
    # A trait group's continuing members whose values changed (0 for an audience).
    changed: int = 0
    pending: int = 0
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    left_pending: int = 0
    error: str | None = None
    # Sent without traits that put the message over the destination's size limit (reported,
    # not stored: run_deliveries has no column for it).
    trimmed: int = 0
    # Members at the destination before the plan: the removal guard's base (neither stored
    # nor shown).
    current: int = 0

    def stored(self) -> dict[str, Any]:
        """The columns of this destination's ``run_deliveries`` row."""
        return {k: v for k, v in vars(self).items() if k not in ("trimmed", "current")}

    def shown(self) -> dict[str, Any]:
        """A JSON-ready view (``sync --json``)."""
        return {k: v for k, v in vars(self).items() if k != "current"}


@dataclass
class RunReport:
    """The outcome of one run, as printed by `sync` and stored in `runs`."""

    audience: str
    key: str
    status: RunStatus | str
    run_id: int | None = None
    members: int = 0
    invalid: int = 0
    duplicates: int = 0
    destinations: list[DestinationReport] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    invalid_samples: list[str] = field(default_factory=list)
    dry_run: bool = False
    # "audience" or "trait" (for messages that name it).
    kind: str = "audience"

    @property
    def ok(self) -> bool:
        """Whether the run neither failed nor was guarded."""
        return self.status not in ("failed", "guarded", "abandoned", "busy")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "audience": self.audience,
            "key": self.key,
            "status": self.status,
            "run_id": self.run_id,
            "members": self.members,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "invalid_samples": self.invalid_samples,
            "dry_run": self.dry_run,
            "destinations": [d.shown() for d in self.destinations],
        }


def exit_code(reports: Iterable[RunReport]) -> int:
    """The exit code for these runs: the worst outcome decides (failed over partial)."""
    code = EXIT_OK
    for report in reports:
        if not report.ok:
            return EXIT_FAILED
        if report.status in PARTIAL_STATUSES:
            code = EXIT_PARTIAL
    return code
