"""The dataset-building job's typed config, loaded from YAML.

One ``PipelineConfig`` composes each stage's own config (sources, dedup, prompt, engine, sampling,
grading, selection, compression, storage, resources). Its ``content_hash`` covers exactly the fields
that change what the run produces, so re-running the same config resumes the same run, while
resources or the output location can change freely between attempts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from tokenskip.admission import AdmissionConfig
from tokenskip.compress import CompressConfig
from tokenskip.dedup import DedupConfig
from tokenskip.engine import EngineConfig, SamplingConfig
from tokenskip.grading import GradingConfig
from tokenskip.models import model_name
from tokenskip.prompts import INSTRUCTION
from tokenskip.schema import config_hash
from tokenskip.sources import SourceConfig
from tokenskip.storage import StorageConfig

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA = Path(__file__).parent / "data"


def resolve_builtin(path: str) -> str:
    """``builtin:NAME`` -> the bundled ``tokenskip/data/NAME.jsonl`` (the demo's problem set)."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    candidate = BUILTIN_DATA / f"{name}.jsonl"
    if not candidate.exists():
        known = sorted(p.stem for p in BUILTIN_DATA.glob("*.jsonl"))
        raise ValueError(f"unknown bundled problem set {name!r}; bundled sets: {known}")
    return str(candidate)


def portable_path(path: str) -> str:
    """A bundled file's path as ``builtin:NAME`` again (any other unchanged): where the package is
    installed says nothing about the content, so it stays out of run ids."""
    resolved = Path(path)
    if resolved.parent == BUILTIN_DATA and resolved.suffix == ".jsonl":
        return BUILTIN_PREFIX + resolved.stem
    return path


def resolve_builtin_source(source: SourceConfig) -> SourceConfig:
    """``source`` reading the bundled file when its path is ``builtin:NAME``; any other unchanged."""
    if not source.path.startswith(BUILTIN_PREFIX):
        return source
    return source.model_copy(update={"path": resolve_builtin(source.path)})


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(default=INSTRUCTION, description="Instruction placed before the question.")
    system: str | None = Field(
        default=None, description="Optional system message; None keeps the chat template's own default."
    )
    ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="TokenSkip ratio to condition on (question<delim>ratio<delim>) when generating with a "
        "TokenSkip-trained model; None for plain prompts (dataset building).",
    )
    delimiter: str | None = Field(default=None, description="Ratio delimiter; None = the tokenizer's eos.")


class SelectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["all-correct", "shortest-correct", "first-correct"] = Field(
        default="all-correct",
        description="Which correct samples of a problem become training data: all of them (most data), the "
        "shortest (a bias toward concise CoTs), or the first (one per problem, unbiased). Every sample not "
        "kept goes to rejects with its verdict (reason 'policy' for correct samples the policy dropped).",
    )
    max_cot_tokens: int | None = Field(
        default=None,
        ge=1,
        # Not in the run id while unset, so runs made before this field existed keep their ids.
        exclude_if=lambda v: v is None,
        description="Longest CoT (generated tokens) a kept sample may have; TokenSkip keeps correct CoTs of "
        "<= 500 tokens. Correct samples above it become rejects with reason 'too_long' before the policy "
        "chooses, so shortest/first-correct pick among the samples that fit. None keeps every length.",
    )


class PoolSize(BaseModel):
    """How many actors a stage's pool may have: fixed (``4``) or elastic (``"1..4"``: Ray Data's
    autoscaling actor pool starts ``max`` actors, runs on as few as ``min`` when capacity is lost and
    grows back when it returns). In YAML and ``--set``: an int or ``MIN..MAX``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(ge=1, description="Actors the run needs: fewer placeable and it fails (capacity_wait_s).")
    max: int = Field(ge=1, description="Actors the pool grows to when the cluster has room.")

    @model_validator(mode="after")
    def _ordered(self) -> PoolSize:
        if self.min > self.max:
            raise ValueError(f"pool size {self.min}..{self.max}: min is above max")
        return self

    @classmethod
    def parse(cls, value: Any) -> Any:
        """An int (fixed) or ``"MIN..MAX"`` as a PoolSize; anything else is left to pydantic's checks."""
        if isinstance(value, bool):
            raise ValueError(f"expected an actor count or MIN..MAX, got {value!r}")
        if isinstance(value, int):
            return {"min": value, "max": value}
        if isinstance(value, str):
            low, sep, high = value.partition("..")
            try:
                return {"min": int(low), "max": int(high if sep else low)}
            except ValueError:
                raise ValueError(f"expected an actor count or MIN..MAX (e.g. 1..4), got {value!r}") from None
        return value

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def __str__(self) -> str:
        return str(self.min) if self.fixed else f"{self.min}..{self.max}"


def _pool_size_out(size: PoolSize) -> int | str:
    # A fixed size stays an int in manifests and dumps (as configs written before ranges existed).
    return size.min if size.fixed else str(size)


PoolSizeField = Annotated[PoolSize, BeforeValidator(PoolSize.parse), PlainSerializer(_pool_size_out)]


class ResourcesConfig(BaseModel):
    """How the Ray stages are scheduled. Changing these never changes the run id."""

    model_config = ConfigDict(extra="forbid")

    generation_actors: PoolSizeField = Field(
        default=PoolSize(min=1, max=1),
        description="vLLM engine replicas (one actor each): a count, or MIN..MAX for an elastic pool that "
        "keeps running on MIN when a node is lost and grows back to MAX when capacity returns.",
    )
    generation_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs reserved per generation actor. On a small CPU machine keep the sum below the "
        "machine's cores: a pool that takes every CPU starves the read/write steps and stalls.",
    )
    generation_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per generation actor; set to engine.tensor_parallel_size on GPU."
    )
    generation_batch_size: int = Field(
        default=64, ge=1, description="Problems per Ray Data batch handed to a generation actor."
    )
    generation_max_concurrent_batches: int = Field(
        default=16,
        ge=1,
        description="Batches one generation actor holds at most (Ray Data hands it no more): the hard cap "
        "on the problems (this x generation_batch_size) and results an actor holds, whatever the run's "
        "size. generation_admission decides which held batches are in the engine; with engine_fullness "
        "keep this at the plan's recommendation (hold_factor watermarks of sequences: batches with a "
        "straggler stay held until it ends), or the engine runs short. 1 = one batch at a time: the "
        "engine drains to the batch's longest sample before the next batch enters.",
    )
    generation_admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig,
        description="When a held batch enters the engine (tokenskip.admission): by default while the "
        "engine's waiting + running sequences are below queue_factor x max_num_seqs, so stragglers never "
        "hold admission shut.",
    )
    compression_actors: PoolSizeField = Field(
        default=PoolSize(min=1, max=1),
        description="Scorer replicas (each loads the scorer model): a count or MIN..MAX, as generation_actors.",
    )
    compression_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per scorer actor.")
    compression_gpus: float = Field(default=0.0, ge=0, description="GPUs per scorer actor.")
    compression_batch_size: int = Field(
        default=32,
        ge=1,
        description="CoTs per scoring call. The stage receives whole shards and scores them in calls of "
        "this many.",
    )
    grading_cpus: float = Field(default=0.25, gt=0, description="CPUs per grading task.")
    write_cpus: float = Field(
        default=0.25,
        gt=0,
        description="CPUs per write task (Parquet encoding + upload of one shard's parts, on the worker "
        "that holds the rows, so the driver never sees them).",
    )
    shard_size: int = Field(
        default=64,
        ge=1,
        description="Problems per committed shard. Smaller shards lose less work when a run dies and show "
        "progress sooner; larger ones make fewer, bigger Parquet files. A shard stays whole from "
        "generation to the write stage (workers write it) when generation_batch_size is a multiple of "
        "it; otherwise the driver assembles and writes split shards (correct, but their rows pass "
        "through the driver).",
    )
    omp_threads: int | None = Field(
        default=None,
        description="Torch/OMP threads inside each actor. Ray sets OMP_NUM_THREADS to the actor's CPU "
        "count (1 for fractional actors); None uses max(1, round(cpus)).",
    )
    capacity_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a run waits for the cluster to place every pool's minimum (generation, "
        "scorer, grading actors) before each pass over the shards; past it the run fails with one line "
        "naming the missing resources (committed shards stay; a re-run resumes). Raise it on an "
        "autoscaling cluster whose new nodes take longer to join.",
    )
    stop_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="On SIGTERM/SIGINT, how long shards already in the stages may take to finish and "
        "commit before the run stops (then: lease released, report written, exit 6). The default "
        "leaves room for that inside Kubernetes' 30 s termination grace period.",
    )


class ClusterDemand(NamedTuple):
    """The CPUs and GPUs a run's stages hold at once: what the cluster must have for it to start."""

    cpus: float
    gpus: float


def cluster_demand(config: PipelineConfig) -> ClusterDemand:
    """Every actor pool at its size (Ray Data starts fixed pools whole, and a pool that cannot start
    stalls the run), the grading actor and one write task. A run without compression starts no
    scorer pool (its keep-whole step is a task of grading's size)."""
    r = config.resources
    # Elastic pools start at their max (tokenskip.capacity): that is what they ask the cluster for.
    scorers = 0 if config.compression is None else r.compression_actors.max
    return ClusterDemand(
        cpus=r.generation_actors.max * r.generation_cpus
        + scorers * r.compression_cpus
        + r.grading_cpus
        + r.write_cpus,
        gpus=r.generation_actors.max * r.generation_gpus + scorers * r.compression_gpus,
    )


class PipelineConfig(BaseModel):
    """Everything the dataset-building job needs. Every field is documented in its stage's config."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Dataset name: a folder below the output root.")
    run_id: str | None = Field(
        default=None,
        description="Run folder name. None derives it from the content hash, so the same config resumes "
        "the same run; set it to start a separate run with the same content.",
    )
    sources: list[SourceConfig] = Field(min_length=1, description="Problem sets to read.")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    engine: EngineConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    grading: GradingConfig = Field(default_factory=GradingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    compression: CompressConfig | None = Field(
        default_factory=CompressConfig,
        description="How kept CoTs are pruned. null builds a pool of plain CoTs: no scorer is loaded and no "
        "compress stage runs; kept rows keep the same data schema with `compressions: []` (train reads "
        "them with mix.ratios [1.0], or format cot). Their forcing (force_tokens, force_digits, "
        "drop_consecutive) left at auto is set here from TokenSkip's choice for the target model "
        "(compression.target_tokenizer, else engine.model): see tokenskip.scoring.tokenskip_forcing.",
    )
    output: StorageConfig = Field(default_factory=lambda: StorageConfig(root="./outputs"))
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @field_validator("sources")
    @classmethod
    def _resolve_builtin_sources(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        return [resolve_builtin_source(s) for s in sources]

    @model_validator(mode="after")
    def _forcing_for_the_target(self) -> PipelineConfig:
        # Resolved here, not at scoring time, so the run id and the manifest hold the values used: a
        # non-Qwen target resolves to the values that were the defaults before auto existed, so the
        # run ids of such configs did not change.
        if self.compression is not None:
            target = self.compression.target_tokenizer or self.engine.model
            scorer = self.compression.scorer.resolve_forcing(target)
            if scorer is not self.compression.scorer:
                self.compression = self.compression.model_copy(update={"scorer": scorer})
        return self

    # The config fields generation_fingerprint reads, as paths into the config: a change to any of
    # them re-keys every sample (refresh names the ones that differ from LATEST's).
    GENERATION_FIELDS: ClassVar[tuple[str, ...]] = (
        "engine.model",
        "engine.tokenizer",
        "engine.dtype",
        "engine.seed",
        "prompt",
        "sampling",
    )

    def generation_fingerprint(self) -> dict[str, Any]:
        """What determines a generated sample: model, prompt and sampling (the key's config part).
        Models by their portable names (:func:`tokenskip.models.model_name`), as the config dumps them."""
        return {
            "model": model_name(self.engine.model),
            "tokenizer": None if self.engine.tokenizer is None else model_name(self.engine.tokenizer),
            "dtype": self.engine.dtype,
            "seed": self.engine.seed,
            "prompt": self.prompt.model_dump(),
            "sampling": self.sampling.model_dump(),
        }

    def generation_hash(self) -> str:
        return config_hash(self.generation_fingerprint())

    def content_hash(self) -> str:
        """Hash of everything that changes the output (not resources, not where it is written)."""
        content = self.model_dump(mode="json", exclude={"resources", "output", "run_id"})
        for source in content["sources"] + content["dedup"]["eval_sets"]:
            source.pop("storage_options", None)  # credentials/endpoints do not change the content
            source.pop("license", None)  # a statement about the data, not the data
            # The same config in another checkout (CI's clone, a cluster's image) is the same run.
            source["path"] = portable_path(source["path"])
        if content.get("compression"):
            content["compression"]["scorer"].pop("cache_dir", None)  # where models are cached, not which
        return config_hash(content)

    def resolved_run_id(self) -> str:
        return self.run_id or f"run-{self.content_hash()[:16]}"


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; ``${VAR}`` in strings is expanded from the environment."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return _expand_env(data)


class OverrideError(ValueError):
    """A ``--set key=value`` that does not fit the config (bad syntax, a path through a scalar, a list
    index out of range)."""


def add_config_arguments(parser: argparse.ArgumentParser, *, config_help: str, dry_run_help: str) -> None:
    """``--config FILE``, ``--set KEY=VALUE`` (repeatable) and ``--dry-run``: the options of every
    command that runs from a YAML config (``args.set`` goes to :func:`tokenskip.config.parse_overrides`)."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field: a dotted key and a YAML value (a.b=1); repeatable",
    )
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set a.b=value`` pairs -> {dotted key: value}; values are parsed as YAML (numbers, booleans,
    lists, mappings), so ``--set sampling.n=4`` sets an int and ``--set x=[1,2]`` a list."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            raise OverrideError(f"--set expects key=value with a dotted key (a.b.c=1), got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise OverrideError(f"--set {pair!r}: the value is not valid YAML ({exc})") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key in ``data`` (in place; returned). Missing mappings are created; digits index
    lists (``sources.0.limit``). Walking through a scalar or past a list's end is an
    :class:`OverrideError` naming the key, never a TypeError or IndexError from deep inside."""
    for dotted, value in overrides.items():
        node: Any = data
        *parents, leaf = dotted.split(".")
        walked = []
        for part in [*parents, leaf]:
            is_leaf = len(walked) == len(parents)
            where = ".".join(walked) or "the top level"
            if isinstance(node, list):
                if not part.isdigit():
                    raise OverrideError(f"--set {dotted}: {where} is a list; index it with a number")
                index = int(part)
                if index >= len(node):
                    raise OverrideError(
                        f"--set {dotted}: {where} has {len(node)} entries (0-{len(node) - 1})"
                    )
                if is_leaf:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if is_leaf:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise OverrideError(f"--set {dotted}: {where} is {node!r}, not a mapping or list")
            walked.append(part)
    return data


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(
    model: type[ConfigT], path: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> ConfigT:
    """The one way every job reads its config: YAML (``${VAR}`` expanded), then ``--set`` overrides,
    then validation by ``model`` (unknown keys are errors)."""
    return model.model_validate(apply_overrides(load_yaml(path), overrides or {}))


def load_pipeline_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
