"""Launch a fine-tuning run on Ray Train (``tokenskip train --config train.yaml``).

Failures restart the worker group from the latest checkpoint (``checkpoint.max_failures``); a run
started again with the same ``name`` and ``storage_path`` also continues from its latest checkpoint,
because Ray Train restores it from the run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from tokenskip.config import add_config_arguments
from tokenskip.train.config import CheckpointSettings, TrainConfig, load_train_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the run ended: its final metrics and the latest checkpoint's location."""

    metrics: dict[str, Any]
    checkpoint_path: str | None
    run_path: str
    error: str | None


def storage_target(settings: CheckpointSettings) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for ``RunConfig``.

    With a custom S3 endpoint Ray cannot build the filesystem from a URL, so we pass a pyarrow
    ``S3FileSystem`` and the bucket/prefix path without scheme.
    """
    path = settings.storage_path
    if "://" not in path:
        # Ray parses storage paths as URIs: a relative local folder must become absolute.
        return os.path.abspath(os.path.expanduser(path)), None
    if not (path.startswith("s3://") and settings.endpoint_url):
        return path, None
    from pyarrow import fs

    scheme = "https" if settings.endpoint_url.startswith("https://") else "http"
    endpoint = settings.endpoint_url.split("://", 1)[1]
    filesystem = fs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=settings.region)
    return path[len("s3://") :].rstrip("/"), filesystem


def _local_to_absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """The config with local data/dev paths made absolute: Ray workers run in another directory."""
    raw = config.model_dump()
    sources = [raw["data"]] if raw["data"] else []
    if raw["tldr"]:
        sources += [domain["source"] for domain in raw["tldr"]["domains"]]
        raw["tldr"]["dev"]["path"] = _local_to_absolute(raw["tldr"]["dev"]["path"])
    for source in sources:
        source["path"] = _local_to_absolute(source["path"])
        source["storage_root"] = _local_to_absolute(source["storage_root"])
    return TrainConfig.model_validate(raw)


def check_sources(config: TrainConfig) -> None:
    """Fail on the driver, before any worker starts, when a data source cannot be found."""
    import fsspec

    from tokenskip.storage import StorageConfig, read_manifest

    sources = [config.data] if config.data else [d.source for d in config.tldr.domains]
    for source in sources:
        if source.storage_root:
            storage = StorageConfig(root=source.storage_root, storage_options=source.storage_options)
            read_manifest(storage, source.dataset, source.run_id)  # raises NotCommitted with the reason
        else:
            fs, path = fsspec.core.url_to_fs(source.path, **source.storage_options)
            if not fs.exists(path):
                raise FileNotFoundError(f"training data {source.path} does not exist")


def training_datasets(config: TrainConfig) -> dict[str, Any]:
    """One lazy Ray dataset per domain (name -> dataset): each source read and tokenized in Ray Data
    tasks (:func:`tokenskip.train.data.tokenized_dataset`) as the workers iterate it."""
    from tokenskip.train.data import tokenized_dataset
    from tokenskip.train.loop import domain_names

    sources = [d.source for d in config.tldr.domains] if config.mode == "tldr" else [config.data]
    tokenizer = config.tokenizer or config.model
    return {
        name: tokenized_dataset(source, tokenizer, config.system, config.optim.cutoff_len, config.stream)
        for name, source in zip(domain_names(config), sources, strict=True)
    }


def worker_cpus(config: TrainConfig) -> float:
    """CPUs one training worker reserves (Ray Train's default: 1 on CPU workers, none beside a GPU)."""
    resources = config.scaling.resources_per_worker
    if resources is None:
        return 0.0 if config.scaling.use_gpu else 1.0
    return float(resources.get("CPU", 0.0))


def check_room_for_data_tasks(config: TrainConfig, cluster_cpus: float) -> None:
    """Fail before training when the workers would take every CPU of a cluster that holds them.

    The data reach the workers through Ray Data tasks (read and tokenize, ``stream.tokenize_num_cpus``
    CPUs each) that run beside the workers' placement group; with no CPU left they never start, and
    every worker waits for its first batch forever: Ray Data has no timeout, and the run hangs instead
    of failing. A cluster too small for the workers themselves is left to Ray (an autoscaler may add
    nodes, and it then adds them for the data tasks too)."""
    from tokenskip.errors import UserError

    taken = config.scaling.num_workers * worker_cpus(config)
    needed = config.stream.tokenize_num_cpus
    if taken <= cluster_cpus < taken + needed:
        raise UserError(
            f"the {config.scaling.num_workers} training workers take {taken:g} of the cluster's "
            f"{cluster_cpus:g} CPUs, which leaves none for the Ray Data tasks that read and tokenize "
            f"the training data (stream.tokenize_num_cpus {needed:g} each): lower "
            f"scaling.resources_per_worker's CPU or add CPUs"
        )


def source_row_counts(config: TrainConfig) -> list[int]:
    """Rows of each domain's source, in domain order (a read, no tokenization; parquet and committed
    datasets answer from metadata). They set the epoch length; the cutoff may drop a few rows."""
    from tokenskip.train.data import TrainingDataError, source_dataset

    sources = [d.source for d in config.tldr.domains] if config.mode == "tldr" else [config.data]
    counts = [source_dataset(source).count() for source in sources]
    for source, count in zip(sources, counts, strict=True):
        if count == 0:
            raise TrainingDataError(f"training data {source.path or source.dataset} has no rows")
    return counts


def build_trainer(config: TrainConfig, progress: Any = None, dev_results: Any = None):
    """The ``TorchTrainer`` for ``config`` (separate from :func:`run_training` for dry runs);
    ``progress``: a :class:`~tokenskip.progress.ProgressBoard` for the live step display;
    ``dev_results``: a :class:`~tokenskip.train.tldr.DevResultBoard` actor (TL;DR with backend 'vllm'
    on several workers)."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tokenskip.train.loop import train_loop_per_worker

    domain_rows = source_row_counts(config)  # a Ray Data read: connects to / starts Ray
    check_room_for_data_tasks(config, ray.cluster_resources().get("CPU", 0.0))
    storage_path, storage_filesystem = storage_target(config.checkpoint)
    scaling = ScalingConfig(
        num_workers=config.scaling.num_workers,
        use_gpu=config.scaling.use_gpu,
        resources_per_worker=config.scaling.resources_per_worker,
    )
    run_config = RunConfig(
        name=config.name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
    )
    loop_config: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "domain_rows": domain_rows,
    }
    if progress is not None:
        loop_config["progress"] = progress  # rank 0 posts each step for the driver's live display
    if dev_results is not None:
        loop_config["dev_results"] = dev_results
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(
            backend="nccl" if config.scaling.use_gpu else "gloo",
            timeout_s=int(config.scaling.collective_timeout_s),
        ),
        scaling_config=scaling,
        run_config=run_config,
        datasets=training_datasets(config),
        # Not split: every worker reads every domain's stream in its stored order (preserve_order) and
        # keeps its own slots, so the order is a pure function of (seed, step) whatever the world size.
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def _needs_dev_results(config: TrainConfig) -> bool:
    return config.mode == "tldr" and config.tldr.backend == "vllm" and config.scaling.num_workers > 1


@contextlib.contextmanager
def _dev_results_board(config: TrainConfig):
    """The actor that hands TL;DR's dev results to every rank (None when the run needs none)."""
    if not _needs_dev_results(config):
        yield None
        return
    import ray

    from tokenskip.train.tldr import DevResultBoard

    board = ray.remote(DevResultBoard).options(num_cpus=0, max_concurrency=1000).remote()
    try:
        yield board
    finally:
        ray.kill(board)


def run_training(config: TrainConfig, *, progress: bool = False) -> TrainResult:
    """Fit on Ray Train (connects to / starts Ray as ``ray.init`` would) and return where it ended.

    ``progress``: show the live step display (step / total, loss, tokens/s, ETA; a line every
    ``log_every`` steps when not a TTY), fed through a progress board rank 0 posts to."""
    config = resolve_paths(config)
    check_sources(config)
    if not progress:
        with _dev_results_board(config) as dev_results:
            result = build_trainer(config, dev_results=dev_results).fit()
    else:
        from tokenskip.console import StepDisplay
        from tokenskip.progress import ProgressBoard
        from tokenskip.ray_runtime import init_ray

        init_ray()  # the quiet console's Ray settings, before Ray Train would start one of its own
        board = ProgressBoard.start()
        display = StepDisplay(board=board, every=config.log_every)
        display.start()
        try:
            with _dev_results_board(config) as dev_results:
                result = build_trainer(config, progress=board, dev_results=dev_results).fit()
        finally:
            display.close()
            board.close()
    return TrainResult(
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        run_path=result.path,
        error=repr(result.error) if result.error else None,
    )


def run_command(args: argparse.Namespace) -> int:
    """``tokenskip train``: a short summary on stdout (``--json``: the final metrics and checkpoint as
    JSON instead); 1 when training failed. The log goes under the checkpoint storage path."""
    from tokenskip.config import parse_overrides
    from tokenskip.console import place_log

    config = load_train_config(args.config, parse_overrides(getattr(args, "set", None)))
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=1))
        return 0
    place_log(getattr(args, "run_log", None), config.checkpoint.storage_path)
    result = run_training(config, progress=True)
    if getattr(args, "json", False):
        print(
            json.dumps(
                {"metrics": result.metrics, "checkpoint": result.checkpoint_path, "run": result.run_path}
            )
        )
    else:
        print(training_summary(result))
    return 0 if result.error is None else 1


def training_summary(result: TrainResult) -> str:
    """Where training ended, in a few lines for a person."""
    m = result.metrics

    def figure(key: str, spec: str) -> str:
        value = m.get(key)
        return format(value, spec) if isinstance(value, (int, float)) else "?"

    head = "training failed" if result.error else "trained"
    lines = [
        f"{head}: step {m.get('step', '?')}, epoch {figure('epoch', '.2f')}, loss {figure('loss', '.4f')}, "
        f"lr {figure('lr', '.2e')}, {figure('tokens_per_s', '.0f')} tokens/s"
    ]
    if result.error:
        lines.append(f"error: {result.error}")
    lines.append(f"checkpoint: {result.checkpoint_path or 'none saved'}")
    lines.append(f"run folder: {result.run_path} (--json prints the final metrics as JSON)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        config_help="YAML TrainConfig (see tokenskip/configs/train_*.yaml)",
        dry_run_help="validate and print the config, do not train",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the final metrics and checkpoint as JSON, not a summary"
    )
