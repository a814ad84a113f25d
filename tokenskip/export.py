"""``tokenskip export``: a committed dataset's SFT mix in the formats other trainers read.

* ``llamafactory``: LLaMA-Factory's alpaca JSON (a list of ``instruction``/``input``/``output``
  records, plus ``system`` when the mix sets one) and its ``dataset_info.json`` entry. This is the
  format TokenSkip itself trains from (its ``get_llamafactory_input.py``).
* ``messages``: chat-messages JSONL (``{"messages": [...]}`` a line), the conversational format of
  TRL's ``SFTTrainer`` and the Hugging Face trainers.

The records are exactly what ``tokenskip train`` builds from the same data with the same ``mix``
options (one :class:`tokenskip.sft.SFTMixer` draws the ratios in row order), so a model trained
elsewhere sees the examples ours would; ``--train-config`` takes the dataset, the mix (its ratio
delimiter included) and the tokenizer from a train config, so both read them from one file. The run is read through its manifest batch by batch and
each record is written as it is made, so memory stays at one Parquet part plus one batch whatever
the size of the run (a million rows included). An output file appears only once it is complete:
locally it is written under a temporary name and renamed, on object storage an upload that fails
is discarded rather than completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
from collections.abc import Iterator
from typing import IO, Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenskip.commands import json_object
from tokenskip.sft import SFTMixConfig, SFTMixer, SFTMixError

FORMATS = ("llamafactory", "messages")
# LLaMA-Factory's alpaca column names (its data/README.md) mapped to our record fields.
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


class ExportError(ValueError):
    """The export cannot run as asked (no such run, rows that are not compressed records, ...)."""


class ExportConfig(BaseModel):
    """What to export, how to mix it, and where the files go."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="tokenskip.storage root holding the dataset (local folder or s3://…).")
    dataset: str = Field(description="Dataset name under root.")
    run_id: str | None = Field(default=None, description="Committed run to export; None follows LATEST.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for root, e.g. {'endpoint_url': …} for MinIO."
    )
    mix: SFTMixConfig = Field(
        default_factory=SFTMixConfig,
        description="The ratio mix, the same options as a train config's `data.sources[].mix`.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="The target model (hub id, local folder or the embedded model) whose eos is TokenSkip's "
        "delimiter and whose tokenizer counts output tokens, as in `train`. Needed unless mix.delimiter is set.",
    )
    format: Literal["llamafactory", "messages"] = Field(
        default="llamafactory",
        description="'llamafactory' (alpaca JSON + dataset_info.json) or 'messages' (JSONL).",
    )
    output: str = Field(description="Folder the files go to (local or s3://…); created when missing.")
    output_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for output (defaults to storage_options)."
    )
    name: str | None = Field(
        default=None,
        description="File stem and LLaMA-Factory dataset name; default <dataset>_tokenskip.",
    )
    batch_size: int = Field(default=1024, ge=1, description="Rows read and mixed at a time.")

    @model_validator(mode="after")
    def _delimiter_source(self) -> ExportConfig:
        mix = self.mix
        if mix.delimiter is None and mix.condition_on_ratio and any(r < 1.0 for r in mix.ratios):
            if not self.tokenizer:
                raise ValueError(
                    "set `tokenizer` (the target model: its eos is TokenSkip's delimiter) or `mix.delimiter`"
                )
        return self

    @property
    def dataset_name(self) -> str:
        return self.name or f"{self.dataset}_tokenskip"

    @property
    def data_file(self) -> str:
        return self.dataset_name + (".json" if self.format == "llamafactory" else ".jsonl")


class ExportResult(BaseModel):
    """What an export wrote."""

    files: list[str]
    records: int
    by_ratio: dict[str, int]


def _alpaca(record: dict[str, Any], system: str | None) -> dict[str, str]:
    out = {"instruction": record["instruction"], "input": record["input"], "output": record["output"]}
    if system:
        out["system"] = system
    return out


def _records(config: ExportConfig, tokenizer: Any) -> Iterator[dict[str, Any]]:
    """The SFT records of the run, in manifest order, batch by batch."""
    from tokenskip.storage import StorageConfig, iter_batches

    storage = StorageConfig(root=config.root, storage_options=config.storage_options)
    mixer = SFTMixer(config.mix, tokenizer)
    for batch in iter_batches(
        storage, config.dataset, "data", run_id=config.run_id, batch_size=config.batch_size
    ):
        if "compressions" not in batch.schema.names:
            raise ExportError(
                f"{config.dataset}: its rows have no `compressions` column, so they are not compressed records"
            )
        yield from mixer.mix(pa.Table.from_batches([batch])).to_pylist()


@contextlib.contextmanager
def _complete_or_nothing(url: str, storage_options: dict[str, Any]) -> Iterator[IO[str]]:
    """A text file at ``url`` that exists only if the block finishes (see the module docstring)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    target = f"{path}.tmp-{os.getpid()}" if local else path
    handle = fs.open(target, "wb")
    text = None
    try:
        import io

        text = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
        yield text
        text.flush()
        text.detach()
    except BaseException:
        if local:
            handle.close()
            fs.rm(target)
        else:
            # s3fs aborts a started multipart upload; a small file was never sent. Marking it closed
            # keeps close() (also run by the garbage collector) from uploading what was buffered.
            discard = getattr(handle, "discard", None)
            if discard is not None:
                discard()
            handle.closed = True
        raise
    handle.close()
    if local:
        fs.mv(target, path)


def _write_dataset_info(config: ExportConfig, options: dict[str, Any]) -> str:
    """Add (or replace) this dataset's entry in the folder's dataset_info.json, keeping other entries,
    so exporting into LLaMA-Factory's own data folder works."""
    import fsspec

    url = posixpath.join(config.output, "dataset_info.json")
    fs, path = fsspec.core.url_to_fs(url, **options)
    info: dict[str, Any] = {}
    if fs.exists(path):
        with fs.open(path, "rb") as handle:
            try:
                info = json.loads(handle.read().decode("utf-8"))
            except ValueError as err:
                raise ExportError(f"{url} exists but is not JSON ({err}); move it away first") from err
    columns = dict(ALPACA_COLUMNS)
    if config.mix.system:
        columns["system"] = "system"
    info[config.dataset_name] = {"file_name": config.data_file, "formatting": "alpaca", "columns": columns}
    with _complete_or_nothing(url, options) as out:
        out.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return url


def _load_tokenizer(name: str | None) -> Any:
    if not name:
        return None
    from transformers import AutoTokenizer

    from tokenskip.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))


def export_dataset(config: ExportConfig, tokenizer: Any = None) -> ExportResult:
    """Write the run's SFT mix in ``config.format`` under ``config.output``; ``tokenizer`` (else
    ``config.tokenizer`` loaded) gives the delimiter and token counts."""
    import fsspec

    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.tokenizer)
    options = config.output_storage_options or config.storage_options
    fs, folder = fsspec.core.url_to_fs(config.output, **options)
    fs.makedirs(folder, exist_ok=True)
    url = posixpath.join(config.output, config.data_file)
    count, by_ratio = 0, {}
    with _complete_or_nothing(url, options) as out:
        if config.format == "llamafactory":
            out.write("[")
        for record in _records(config, tokenizer):
            if config.format == "llamafactory":
                out.write(
                    ("\n  " if count == 0 else ",\n  ")
                    + json.dumps(_alpaca(record, config.mix.system), ensure_ascii=False)
                )
            else:
                out.write(json.dumps({"messages": record["messages"]}, ensure_ascii=False) + "\n")
            count += 1
            key = f"{record['ratio']:.1f}"
            by_ratio[key] = by_ratio.get(key, 0) + 1
        if config.format == "llamafactory":
            out.write("\n]\n")
    files = [url]
    if config.format == "llamafactory":
        files.append(_write_dataset_info(config, options))
    return ExportResult(files=files, records=count, by_ratio=dict(sorted(by_ratio.items(), reverse=True)))


def from_train_config(path: str) -> dict[str, Any]:
    """The export fields of a train config: its data source (root, dataset, run, storage options), its
    mix (the ratio delimiter included, with the config's system message where the mix has none, as
    training does) and its tokenizer. The train config stays the one place that decides them."""
    from tokenskip.preflight import UserError
    from tokenskip.train.config import load_train_config

    train = load_train_config(path)
    data = train.data
    if data is None or not data.storage_root:
        raise UserError(
            f"--train-config {path}: export reads a committed dataset (data.storage_root + data.dataset); "
            "this config has none (a TL;DR config: export each pool with --root/--dataset)"
        )
    mix = (
        data.mix
        if train.system is None or data.mix.system
        else data.mix.model_copy(update={"system": train.system})
    )
    return {
        "root": data.storage_root,
        "dataset": data.dataset,
        "run_id": data.run_id,
        "storage_options": data.storage_options,
        "mix": mix.model_dump(),
        "tokenizer": train.tokenizer or train.model,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train-config",
        default=None,
        help="a tokenskip-mode train config (YAML): export exactly what it trains on, its dataset, run, "
        "mix (ratio delimiter included) and tokenizer; options given here override it",
    )
    parser.add_argument("--root", default=None, help="storage root (local folder or s3://bucket/prefix)")
    parser.add_argument("--dataset", default=None, help="dataset name under the root")
    parser.add_argument("--run-id", default=None, help="committed run (default: LATEST)")
    parser.add_argument("--format", choices=FORMATS, default="llamafactory", help="output format")
    parser.add_argument("--out", required=True, help="output folder (local or s3://…)")
    parser.add_argument("--tokenizer", default=None, help="target model: its eos is the ratio delimiter")
    parser.add_argument("--name", default=None, help="file stem and LLaMA-Factory dataset name")
    parser.add_argument(
        "--storage-options",
        default=None,
        type=json_object,
        help="fsspec options as a JSON object, e.g. an endpoint_url",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an export config field, e.g. mix.ratios=[1.0,0.5] or mix.delimiter='<|eot_id|>' (the train mix options)",
    )


def run_command(args: argparse.Namespace) -> int:
    from tokenskip.config import apply_overrides, parse_overrides
    from tokenskip.preflight import UserError

    given = {
        "root": args.root,
        "dataset": args.dataset,
        "run_id": args.run_id,
        "output": args.out,
        "tokenizer": args.tokenizer,
        "name": args.name,
        "storage_options": args.storage_options,
    }
    given = {key: value for key, value in given.items() if value is not None}
    base = from_train_config(args.train_config) if args.train_config else {}
    raw = {**base, **given, "format": args.format}
    if "root" not in raw or "dataset" not in raw:
        raise UserError("export: give --root and --dataset, or --train-config")
    # A bad field is pydantic's ValidationError, a missing run NotCommitted: the CLI prints either as one line.
    config = ExportConfig.model_validate(apply_overrides(raw, parse_overrides(args.set)))
    try:
        result = export_dataset(config)
    except (ExportError, SFTMixError) as err:  # rows that cannot become examples: nothing is written
        raise UserError(f"export: {err}") from None
    ratios = ", ".join(f"{ratio}: {n}" for ratio, n in result.by_ratio.items())
    print(f"exported {result.records} records ({ratios})")
    for path in result.files:
        print(f"  {path}")
    return 0
