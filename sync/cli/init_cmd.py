"""``audience-sync init``: a commented config and a ``.env.example`` in a folder, never over
existing files."""

from __future__ import annotations

from pathlib import Path

import click

from sync.cli.app import echo_json, json_option
from sync.cli.base import DEFAULT_CONFIG_PATH
from sync.config.starter import env_example_text, example_config_text

ENV_EXAMPLE = ".env.example"


@click.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Folder to write audience-sync.toml and .env.example into.",
)
@json_option
def init(folder: Path, as_json: bool) -> None:
    """Write a commented audience-sync.toml and a .env.example into the current folder
    (refuses to overwrite either)."""
    config_text = example_config_text()
    files = {
        folder / DEFAULT_CONFIG_PATH: config_text,
        folder / ENV_EXAMPLE: env_example_text(config_text),
    }
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise click.ClickException(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "nothing written (move it away or use --dir)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        with path.open("x", encoding="utf-8") as handle:  # "x": never over a file made meanwhile
            handle.write(content)
    written = [str(path) for path in files]
    if as_json:
        echo_json({"written": written})
        return
    click.echo(f"wrote {written[0]} and {written[1]}")
    config = written[0]
    flag = "" if folder == Path(".") else f" --config {config}"
    click.echo(
        f"next: `audience-sync{flag} check` validates it as it is (a demo warehouse); then point "
        "[sources] at your database, add a destination, and copy .env.example to .env"
    )
