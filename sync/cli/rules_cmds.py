"""Looking at a computation before it syncs: ``show-sql`` (what runs on the source) and
``preview`` (how many members now, and a few of them); both write nothing."""

from __future__ import annotations

import json

import click

from sync.cli.app import AppContext, echo_json, json_option, pass_app, print_table
from sync.errors import SourceError
from sync.redaction import redact
from sync.run.preview import (
    DEFAULT_SAMPLE_SIZE,
    compiled_sql,
    find_computation,
    preview,
    runnable_sql,
)


@click.command("show-sql")
@click.argument("audience")
@click.option(
    "--bound",
    is_flag=True,
    help="Print placeholders and the bound values after them (as runs send them), instead of "
    "SQL with the values written in.",
)
@pass_app
def show_sql(app: AppContext, audience: str, bound: bool) -> None:
    """Print the SQL an audience or trait group runs on its source (rules compiled for the
    source's dialect; bound values listed after it)."""
    config = app.config()
    computation = find_computation(config, audience)
    if not bound:
        try:
            runnable = runnable_sql(config, computation)
        except SourceError as exc:  # how the server reads literals is unknown: bind them
            click.echo(redact(f"-- {exc}; showing the placeholders and the bound values"), err=True)
            runnable = None
        if runnable is not None:
            # Redacted as all output is: a `${VAR}` read into the query prints as ***.
            click.echo(redact(runnable))  # values quoted as the server reads them: paste it
            return
    sql, params = compiled_sql(config, computation)
    click.echo(redact(sql))
    if params:
        click.echo("-- parameters (bound, never part of the SQL text):")
        for name, value in params:
            click.echo(redact(f"--   {name} = {json.dumps(value, default=str)}"))


@click.command("preview")
@click.argument("audience")
@click.option(
    "--limit", "size", default=DEFAULT_SAMPLE_SIZE, show_default=True, help="Rows to show."
)
@json_option
@pass_app
def preview_command(app: AppContext, audience: str, size: int, as_json: bool) -> None:
    """Run an audience or trait group on its source and show its member count and a sample;
    nothing is written or sent."""
    config = app.config()
    computation = find_computation(config, audience)
    found = preview(config, computation, size)
    if as_json:
        echo_json({"name": computation.name, "count": found.count, "sample": found.sample})
        return
    click.echo(f'{computation.label} "{computation.name}": {found.count} members now')
    print_table(
        f"Sample ({len(found.sample)} of {found.count})",
        {name: name for name in found.columns},
        found.sample,
    )
