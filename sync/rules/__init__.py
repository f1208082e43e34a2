"""The rule language: audiences and computed traits written as TOML rules, compiled with
SQLAlchemy Core into one SELECT that runs on the source like an audience query (README "Rules").

- ``model``: the TOML shape, parsed and validated with TOML paths (pure).
- ``schema``: how names map onto a warehouse (Segment's warehouse schema by default).
- ``compiler``: rules → ``Select``; ``sql``: the constructs SQLAlchemy does not abstract.

The package sits below ``sync.config`` (which validates rules when it loads the file, so every
problem arrives in one ``ConfigError``) and uses nothing of the state or the run.
"""

from sync.rules.compiler import (
    AudienceDefinition,
    Catalog,
    SourceRules,
    TraitGroupDefinition,
    compile_audience,
    compile_trait_group,
)
from sync.rules.model import (
    Condition,
    RuleProblems,
    TraitComputation,
    parse_condition,
    parse_trait_rules,
)
from sync.rules.schema import SEGMENT_SCHEMA, SchemaMapping

__all__ = [
    "SEGMENT_SCHEMA",
    "AudienceDefinition",
    "Catalog",
    "Condition",
    "RuleProblems",
    "SchemaMapping",
    "SourceRules",
    "TraitComputation",
    "TraitGroupDefinition",
    "compile_audience",
    "compile_trait_group",
    "parse_condition",
    "parse_trait_rules",
]
