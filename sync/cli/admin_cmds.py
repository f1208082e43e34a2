"""Commands that change the state DB by hand: the schema (``db upgrade``, ``db current``),
``retry`` of failed rows and ``retire`` of an audience or one of its destinations."""

from __future__ import annotations

from pathlib import Path

import click

from sync.cli.app import (
    AppContext,
    disposing,
    echo_json,
    json_option,
    pass_app,
    wait_option,
)
from sync.engine import Syncer
from sync.redaction import redact_url
from sync.state.audiences import exit_value_of, stored_audience
from sync.state.db import MigrationPause, make_state_engine, schema_status, upgrade


@click.group()
def db() -> None:
    """Manage the state database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Migrate to this revision.")
@click.option(
    "--test-pause-before",
    hidden=True,
    help="Test seam: stop before the first SQL statement containing this text.",
)
@click.option(
    "--test-ready-file",
    type=click.Path(path_type=Path),
    hidden=True,
    help="Test seam: created when the upgrade stops there.",
)
@json_option
@pass_app
def db_upgrade(
    app: AppContext,
    revision: str,
    test_pause_before: str | None,
    test_ready_file: Path | None,
    as_json: bool,
) -> None:
    """Create or migrate the state database to this version's schema."""
    config = app.config()
    pause = None
    if test_pause_before and test_ready_file:
        pause = MigrationPause(test_pause_before, test_ready_file)
    with disposing(make_state_engine(config.state.url)) as engine:
        # Read under the migration lock: another upgrade may have run while this one waited.
        before = upgrade(engine, revision, pause=pause)
        after = schema_status(engine)
    where = redact_url(config.state.url)
    if as_json:
        echo_json(
            {
                "state": where,
                "from": before,
                "to": after.current,
                "upgraded": before != after.current,
            }
        )
    elif before == after.current:
        click.echo(f"state database {where} already at schema {after.current}")
    else:
        click.echo(f"state database {where} upgraded from {before or 'empty'} to {after.current}")


@db.command("current")
@json_option
@pass_app
def db_current(app: AppContext, as_json: bool) -> None:
    """Show the state database's schema revision and whether it is up to date."""
    with disposing(make_state_engine(app.config().state.url, must_exist=True)) as engine:
        status = schema_status(engine)
    if as_json:
        echo_json({"current": status.current, "head": status.head, "state": status.state})
        return
    click.echo(f"{status.current or 'empty'} (head {status.head}: {status.state})")


@click.command()
@click.argument("audience")
@json_option
@pass_app
def retry(app: AppContext, audience: str, as_json: bool) -> None:
    """Re-queue an audience's failed rows for its next run."""
    with Syncer(app.config(), create_state=False) as syncer:
        count = syncer.retry(audience)
    if as_json:
        echo_json({"audience": audience, "queued": count})
        return
    click.echo(f"{count} failed row(s) of {audience} queued for the next run")


@click.command()
@click.argument("audience")
@click.option("--send-false", is_flag=True, help="Send false to its current members first.")
@click.option(
    "--send-null",
    is_flag=True,
    help="A trait group: send its traits as null to its current members first.",
)
@click.option(
    "--destination",
    default=None,
    metavar="NAME",
    help="Only this destination, which the audience no longer lists (it may stay configured).",
)
@wait_option
@json_option
@pass_app
def retire(
    app: AppContext,
    audience: str,
    send_false: bool,
    send_null: bool,
    destination: str | None,
    wait: float,
    as_json: bool,
) -> None:
    """Retire an audience or trait group removed from the config (its key stays reserved), or
    with --destination its rows at a destination it no longer lists."""
    if send_false and send_null:
        raise click.UsageError("--send-false is for audiences, --send-null for trait groups")
    with Syncer(app.config(), create_state=False) as syncer:
        with syncer.engine.connect() as connection:
            audience_id = stored_audience(connection, app.config(), audience)
            label = (
                "trait group"
                if exit_value_of(connection, audience_id)[0] == "trait"
                else "audience"
            )
        entries = syncer.retire(
            audience,
            destination=destination,
            send_false=send_false,
            send_null=send_null,
            wait=wait,
        )
    sent = sum(e.sent for e in entries)
    if as_json:
        echo_json(
            {
                "audience": audience,
                "destination": destination,
                "retired": destination is None,
                "sent": sent,
                "destinations": [e.stored() for e in entries],
            }
        )
        return
    what = "false" if send_false else "null"
    extra = f" after sending {sent} {what} value(s)" if send_false or send_null else ""
    if destination is None:
        click.echo(f"{label} {audience} retired{extra}; its key stays reserved")
    else:
        click.echo(f"{label} {audience} left destination {destination}{extra}")
