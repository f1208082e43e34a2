"""What `audience-sync init` writes: the shipped example config (commented, runnable as-is on
the generated demo warehouse) and a ``.env.example`` listing every ``${VAR}`` it reads."""

from __future__ import annotations

import re
from pathlib import Path

from sync.errors import AudienceSyncError

# `${NAME}` or `${NAME:-default}` (sync.config.loader's interpolation syntax).
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# A setting, commented out or not (`key = …`, `# write_key = …`): prose mentioning ${VAR} is not.
_SETTING = re.compile(r"^\s*(?:#\s*)?[A-Za-z0-9_.\"-]+\s*=")


def example_config_text() -> str:
    """The example config shipped with audience-sync (in the wheel, or beside the sources)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "config.example.toml", package.parent / "config.example.toml"):
        if candidate.exists():
            return candidate.read_text(encoding="utf-8")
    raise AudienceSyncError("config.example.toml is missing from this installation")


def env_example_text(config_text: str) -> str:
    """A ``.env`` template: each variable the config reads (commented-out lines included),
    once, with the TOML line it appears on; a variable with a default is left commented."""
    lines = [
        "# Environment for audience-sync: copy to .env (docker run --env-file .env, systemd",
        "# EnvironmentFile=) and fill in. Secrets belong here, never in audience-sync.toml.",
        "# Variables with a default in the config are commented out: set them to override.",
        "",
    ]
    seen: set[str] = set()
    for raw in config_text.splitlines():
        if not _SETTING.match(raw):
            continue
        for match in _VARIABLE.finditer(raw):
            name, default = match.group(1), match.group(2)
            if name in seen:
                continue
            seen.add(name)
            lines.append(f"# used by: {raw.strip().lstrip('# ')}")
            lines.append(f"# {name}={default}" if default is not None else f"{name}=")
            lines.append("")
    return "\n".join(lines)
