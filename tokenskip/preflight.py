"""Checks a run can pass before it starts an engine: where it writes and what it loads.

A wrong output root or a mistyped model otherwise shows up minutes later, inside a Ray actor (which
Ray then restarts over and over). ``tokenskip run`` runs these before every run and ``--dry-run``;
the sources are checked by loading them (the plan does that anyway).
"""

from __future__ import annotations

from tokenskip.config import PipelineConfig
from tokenskip.models import model_problem
from tokenskip.storage import output_problem


class UserError(Exception):
    """A problem with what the user asked for (config, inputs, output, model): one clear line."""


def run_problems(config: PipelineConfig) -> list[str]:
    """Everything found wrong with ``config`` short of loading the sources (empty: nothing found)."""
    problems = []
    if (problem := output_problem(config.output)) is not None:
        problems.append(problem)
    models = {"engine.model": config.engine.model}
    if config.compression is not None:  # null: no scorer to load
        models["compression.scorer.model"] = config.compression.scorer.model
        if config.compression.target_tokenizer:
            models["compression.target_tokenizer"] = config.compression.target_tokenizer
    for field, model in models.items():
        if (problem := model_problem(model)) is not None:
            problems.append(f"{field}: {problem}")
    return problems


def check_run(config: PipelineConfig) -> None:
    """:class:`UserError` naming every problem :func:`run_problems` finds."""
    problems = run_problems(config)
    if problems:
        raise UserError("; ".join(problems))
