"""Rules in the config: the catalog of computations the compiler resolves ``member_of`` and
``computed_trait`` against, and each computation's compiled ``Select`` (README "Rules")."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select

from sync.config.models import AudienceConfig, ComputationConfig, Config
from sync.rules import (
    AudienceDefinition,
    Catalog,
    RuleProblems,
    SourceRules,
    TraitGroupDefinition,
    compile_audience,
    compile_trait_group,
    parse_condition,
    parse_trait_rules,
)


def rule_catalog(config: Config) -> tuple[Catalog, list[str]]:
    """Every computation as the compiler sees it, and the problems of parsing their rules."""
    problems: list[str] = []
    audiences = []
    for index, audience in enumerate(config.audiences):
        path = f"audiences[{index}]"
        condition = None
        if audience.rules is not None:
            try:
                condition = parse_condition(audience.rules, f"{path}.rules")
            except RuleProblems as exc:
                problems.extend(exc.problems)
        audiences.append(
            AudienceDefinition(
                name=audience.name,
                key=audience.trait_key,
                source=audience.source,
                path=path,
                condition=condition,
                query=audience.query,
                include_anonymous=audience.include_anonymous,
                traits=tuple(audience.traits),
            )
        )
    groups = []
    for index, group in enumerate(config.traits):
        path = f"traits[{index}]"
        traits = None
        if group.rules is not None:
            try:
                traits = parse_trait_rules(group.rules, f"{path}.rules")
            except RuleProblems as exc:
                problems.extend(exc.problems)
        groups.append(
            TraitGroupDefinition(
                name=group.name,
                key=group.trait_key,
                source=group.source,
                path=path,
                traits=traits,
                query=group.query,
            )
        )
    return Catalog(tuple(audiences), tuple(groups)), problems


def source_rules(config: Config, source: str) -> SourceRules:
    """How rules read a source: its schema mapping and its "now"."""
    settings = config.sources[source]
    return SourceRules(schema=settings.schema_mapping, now_query=settings.now_query)


def compile_rules(
    config: Config, computation: ComputationConfig, catalog: Catalog | None = None
) -> Select[Any]:
    """The computation's rules as one Select; raises ``RuleProblems`` with TOML paths."""
    if catalog is None:
        catalog, problems = rule_catalog(config)
        if problems:
            raise RuleProblems(problems)
    rules = source_rules(config, computation.source)
    if isinstance(computation, AudienceConfig):
        definition = catalog.audience(computation.name)
        assert definition is not None and definition.condition is not None
        return compile_audience(definition, catalog, rules)
    group = catalog.trait_group(computation.name)
    assert group is not None and group.traits is not None
    return compile_trait_group(group, catalog, rules)


def rule_problems(config: Config) -> list[str]:
    """Every problem of every rule set: its shape, its names, member_of (unknown audiences,
    cycles), computed traits. Nothing is run."""
    catalog, problems = rule_catalog(config)
    if problems:
        return problems
    for computation in config.computations:
        if computation.rules is None or computation.source not in config.sources:
            continue
        try:
            compile_rules(config, computation, catalog)
        except RuleProblems as exc:
            problems.extend(exc.problems)
    return list(dict.fromkeys(problems))


__all__ = ["compile_rules", "rule_catalog", "rule_problems", "source_rules"]
