"""The README documents every command (sqlite-utils' test_docs.py, for our Commands table)."""

import re

import click
import pytest

from sync.cli import cli
from tests.conftest import REPO


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[str]:
    paths = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
        else:
            paths.append(" ".join((*prefix, name)))
    return sorted(paths)


# The Commands table's rows: "| `audience-sync db current [--json]` | ..."
ROWS = re.findall(r"^\| `audience-sync ([^`]*)`", (REPO / "README.md").read_text(), re.M)


@pytest.mark.parametrize("path", command_paths(cli))
def test_command_is_in_the_readme(path: str) -> None:
    documented = any(row == path or row.startswith(f"{path} ") for row in ROWS)
    assert documented, f"README's Commands table has no row for `audience-sync {path}`"
