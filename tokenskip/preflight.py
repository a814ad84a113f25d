"""Checks a run can pass before it starts an engine: where it writes and what it loads.

A wrong output root or a mistyped model otherwise shows up minutes later, inside a Ray actor (which
Ray then restarts over and over). ``tokenskip run`` runs these before every run and ``--dry-run``;
the sources are checked by loading them (the plan does that anyway).
"""

from __future__ import annotations

from tokenskip.config import PipelineConfig
from tokenskip.errors import UserError
from tokenskip.models import model_problem
from tokenskip.ray_runtime import relative_root_problem
from tokenskip.storage import output_problem

__all__ = ["UserError", "check_run", "run_problems"]


def run_problems(config: PipelineConfig, *, check_models: bool = True) -> list[str]:
    """Everything found wrong with ``config`` short of loading the sources (empty: nothing found).
    ``check_models=False`` (``--skip-model-check``) leaves the models to the engine and scorer."""
    problems = []
    # A relative root in a Ray job is refused before it is checked: the check would look in the wrong folder.
    if (problem := relative_root_problem(config.output.root) or output_problem(config.output)) is not None:
        problems.append(problem)
    if not check_models:
        return problems
    models = {"engine.model": config.engine.model}
    if config.compression is not None:  # null: no scorer to load
        models["compression.scorer.model"] = config.compression.scorer.model
        if config.compression.target_tokenizer:
            models["compression.target_tokenizer"] = config.compression.target_tokenizer
    for field, model in models.items():
        if (problem := model_problem(model)) is not None:
            problems.append(f"{field}: {problem}")
    return problems


def check_run(config: PipelineConfig, *, check_models: bool = True) -> None:
    """:class:`UserError` naming every problem :func:`run_problems` finds."""
    problems = run_problems(config, check_models=check_models)
    if problems:
        raise UserError("; ".join(problems))
