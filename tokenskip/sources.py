"""Problem sources: read GSM8K, MATH / MATH-500, AIME or a custom set into ``PROBLEM_SCHEMA`` rows.

Every input record ends up in exactly one of two tables, or is counted as filtered out by the
source's ``where`` (a selection, not an error), so ``input records = problems + errors + filtered``:

``PROBLEM_SCHEMA`` (:mod:`tokenskip.schema`), one row per usable problem:

* ``id`` - :func:`tokenskip.schema.problem_id` of (source name, question): a content hash, stable
  across loads, file orders and machines; the original data set's own id is kept in metadata.
* ``question`` - the problem text exactly as given (not normalised).
* ``answer`` - the gold *final* answer as a string (GSM8K ``#### N`` -> ``N``; MATH: the ``answer``
  field, else the last ``\\boxed{...}`` of the solution; numbers are stringified).
* ``source`` - :attr:`SourceConfig.name` (defaults to the kind, e.g. ``gsm8k``).
* ``split`` - :attr:`SourceConfig.split`.
* ``metadata`` - a JSON object with everything else: the reference ``solution`` (GSM8K ``cot`` or
  the text before ``####``, MATH ``solution``), ``source_id`` (the set's own id) and every other
  input field, so nothing of the input is lost.

``ERROR_SCHEMA``, one row per record that could not become a problem, with ``stage`` =
:data:`STAGE` (``sources``), a machine-readable ``error`` (see :data:`ERROR_REASONS`), an
``error_detail`` naming the file and line, and
``raw`` = the offending input JSON-encoded (bytes that are not UTF-8 survive as ``\\udcXX`` escapes,
so even those can be recovered exactly with ``errors="surrogateescape"``).

Three entry points:

* :func:`load_source` - the whole source in this process: a :class:`LoadedSource` (problems, errors
  and how many records ``where`` filtered out); :func:`load_problems` is its (problems, errors) pair.
* :func:`normalise_rows` - one batch of already parsed records; the pipeline reads jsonl/parquet
  with Ray Data and calls it from ``map_batches``.
* :func:`iter_raw_rows` - the tolerant reader underneath :func:`load_problems`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenskip.grading.extract import find_last_boxed
from tokenskip.schema import ERROR_SCHEMA, PROBLEM_SCHEMA, SOURCES_STAGE, problem_id, to_table

STAGE = SOURCES_STAGE

ERROR_REASONS = {
    "invalid_json": "the line (or, for format json, the file) is not valid JSON",
    "invalid_unicode": "the bytes are not UTF-8, or a string holds a lone surrogate",
    "not_an_object": "the record is valid JSON but not an object (a list, a number, ...)",
    "missing_question": "the question field is absent or null",
    "empty_question": "the question is empty or only whitespace",
    "wrong_type": "a question/answer of the wrong type (list, dict, bool, non-finite number ...)",
    "question_too_long": "the question has more characters than max_question_chars",
    "missing_answer": "the answer is absent or null and could not be extracted from the solution",
    "empty_answer": "the answer is empty or only whitespace",
}

Kind = Literal["gsm8k", "math", "aime", "custom"]
AnswerExtraction = Literal["none", "gsm8k_hash", "boxed"]


class FieldMap(BaseModel):
    """Where a record keeps its question, answer, solution and id (dotted paths reach nested fields)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="Field holding the problem text. Required for custom sets.")
    answer: str | None = Field(
        default=None,
        description="Field holding the gold final answer. None: extract it from `solution` with "
        "`answer_extraction` (slower and only as good as the extraction rule).",
    )
    solution: str | None = Field(
        default=None,
        description="Field holding a reference solution; kept in metadata as `solution` and used for "
        "answer extraction when the answer field is missing.",
    )
    id: str | None = Field(
        default=None,
        description="Field holding the data set's own id; kept in metadata as `source_id` (the problem key "
        "is always the content hash, so a renumbered source keeps its keys).",
    )
    metadata: list[str] | None = Field(
        default=None,
        description="Extra top-level fields to keep in metadata. None keeps every other field (nothing lost, "
        "larger rows); a list keeps only those (smaller rows, the rest is dropped on purpose).",
    )
    answer_extraction: AnswerExtraction = Field(
        default="none",
        description="How to get the final answer out of answer/solution text: `gsm8k_hash` takes the text "
        "after the last `####` of the answer (solution text moves to metadata), `boxed` takes the last "
        "`\\boxed{}` of the solution when the answer is missing, `none` uses the answer as is.",
    )


# Layouts of the public sets; a SourceConfig.field_map replaces these for any kind.
DEFAULT_FIELD_MAPS: dict[str, FieldMap] = {
    # TokenSkip's layout (question, answer = final number, cot) and the original (answer ends "#### N").
    "gsm8k": FieldMap(
        question="question", answer="answer", solution="cot", id="id", answer_extraction="gsm8k_hash"
    ),
    # MATH / MATH-500: problem, solution, answer (MATH itself has no answer field: boxed extraction).
    "math": FieldMap(
        question="problem", answer="answer", solution="solution", id="unique_id", answer_extraction="boxed"
    ),
    # AIME in the TLDR repository's layout.
    "aime": FieldMap(question="query", answer="ref_answer", id="id"),
}


class SourceConfig(BaseModel):
    """One problem source: where it is, what layout it has, and how strict loading is."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="Local path or fsspec URL (s3://bucket/key, gs://, https://...) of a file, a directory "
        "(every *.jsonl / *.json / *.parquet file under it, sorted) or a glob. Compression (.gz, .bz2, .xz, "
        ".zst) is inferred from the suffix."
    )
    format: Literal["jsonl", "json", "parquet", "auto"] = Field(
        default="auto",
        description="File format. `jsonl`: one record per line (bad lines become errors, the rest loads); "
        "`json`: each file is one JSON document, an object (one record, e.g. the original MATH layout of one "
        "file per problem) or an array of records; `auto` picks by suffix: .parquet/.pq -> parquet, .json -> "
        "json when the whole file parses as one document, else jsonl.",
    )
    kind: Kind = Field(default="custom", description="Data set layout; `custom` requires `field_map`.")
    name: str | None = Field(
        default=None,
        description="Source name written to `source` and hashed into the problem id. Defaults to the kind; "
        "give two sets of the same kind different names or their identical questions share one id.",
    )
    split: str = Field(default="train", description="Split label written to every row (not part of the id).")
    license: str | None = Field(
        default=None,
        description="Licence of the source data, stated in the run's dataset card (README.md). None: the "
        "kind's published licence where it is known (gsm8k, math: MIT; the bundled demo: Apache-2.0), else "
        "the card says it is not stated. Not part of the run id.",
    )
    field_map: FieldMap | None = Field(
        default=None, description="Field layout; overrides the kind's default layout. Required for `custom`."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, e.g. {'endpoint_url': 'http://127.0.0.1:9000'} or "
        "{'client_kwargs': {'endpoint_url': ...}} for an S3-compatible server, or credentials.",
    )
    limit: int | None = Field(
        default=None,
        ge=0,
        description="Read at most this many input records (valid or not), in file order; None reads all. "
        "For quick runs and tests; the ids of the rows read do not change.",
    )
    where: dict[str, list[str | int | float | bool]] | None = Field(
        default=None,
        # Not in the run id while unset, so runs made before this field existed keep their ids.
        exclude_if=lambda v: v is None,
        description="Keep only records whose fields hold one of the listed values, e.g. "
        "{level: ['Level 4', 'Level 5']} for MATH's hardest problems (difficulty splits). Keys are input "
        "field names (dotted paths reach nested fields); a record must match every key; a record without "
        "the field does not match. Records it drops are counted (`filtered_out` in the plan and report), "
        "not errors. Applied after `limit`, which counts records read. None keeps every record.",
    )
    max_question_chars: int = Field(
        default=20_000,
        gt=0,
        description="Longer questions become `question_too_long` errors: a bound on prompt size and memory "
        "that still admits the longest real competition problems (a few thousand characters).",
    )

    @model_validator(mode="after")
    def _custom_needs_field_map(self) -> SourceConfig:
        if self.kind == "custom" and self.field_map is None:
            raise ValueError("kind='custom' needs a field_map naming at least the question field")
        if self.where is not None:
            empty = sorted(field for field, values in self.where.items() if not values)
            if not self.where or empty:
                raise ValueError(
                    f"where: every field needs at least one allowed value (empty: {empty or 'the mapping'})"
                )
        return self

    @property
    def source_name(self) -> str:
        return self.name or self.kind

    @property
    def fields(self) -> FieldMap:
        return self.field_map or DEFAULT_FIELD_MAPS[self.kind]


@dataclass(frozen=True)
class RawRecord:
    """One input record: a parsed ``row`` or, when it could not be parsed, an ``error`` row."""

    location: str
    row: Any = None
    error: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------------
# Answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included.

    Also accepts the brace-less ``\\boxed 5`` form. None when there is none or its braces never close.
    The parser is grading's (:func:`tokenskip.grading.find_last_boxed`), so a MATH gold answer is read
    out of its solution exactly as a response's boxed answer is read out of the response.
    """
    found = find_last_boxed(text)
    return None if found is None else found[1]


def split_gsm8k_answer(text: str) -> tuple[str, str] | None:
    """``"solution ... #### 1,234"`` -> ``("solution ...", "1,234")``; None without ``####``.

    The number is kept as written (thousands separators included), exactly as TokenSkip's layout of the
    same data has it, so both layouts give the same gold answer; grading normalises numbers.
    """
    if "####" not in text:
        return None
    solution, _, final = text.rpartition("####")
    return solution.rstrip(), final.strip()


# ---------------------------------------------------------------------------------------------------------
# Row normalisation


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_MISSING = object()


def _lookup(row: dict[str, Any], path: str | None) -> Any:
    """Dotted-path lookup; ``_MISSING`` when any step is absent. A top-level key with dots wins."""
    if path is None:
        return _MISSING
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _is_null(value: Any) -> bool:
    # Tabular readers (pandas batches in Ray Data) write a missing value as NaN.
    return value is None or value is _MISSING or (isinstance(value, float) and math.isnan(value))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return repr(value)


def raw_json(value: Any) -> str:
    """JSON for the ``raw`` column: readable UTF-8 where possible, ASCII escapes where a string is not."""
    text = json.dumps(value, ensure_ascii=False, default=_json_default)
    return json.dumps(value, default=_json_default) if _has_surrogates(text) else text


def _number_text(value: numbers.Number) -> str:
    if isinstance(value, numbers.Integral):
        return str(int(value))
    as_float = float(value)  # type: ignore[arg-type]
    if not math.isfinite(as_float):
        raise _RowError("wrong_type", f"answer is a non-finite number ({as_float})")
    return str(int(as_float)) if as_float.is_integer() else repr(as_float)


def _question_text(row: dict[str, Any], fields: FieldMap, max_chars: int) -> str:
    value = _lookup(row, fields.question)
    if _is_null(value):
        state = "absent" if value is _MISSING else "null"
        raise _RowError("missing_question", f"question field {fields.question!r} is {state}")
    if not isinstance(value, str):
        raise _RowError(
            "wrong_type", f"question field {fields.question!r} is {type(value).__name__}, expected string"
        )
    if not value.strip():
        raise _RowError("empty_question", f"question field {fields.question!r} is empty")
    if _has_surrogates(value):
        raise _RowError("invalid_unicode", f"question field {fields.question!r} holds a lone surrogate")
    if len(value) > max_chars:
        raise _RowError("question_too_long", f"question has {len(value)} characters, more than {max_chars}")
    return value


def _optional_text(row: dict[str, Any], field: str | None) -> str | None:
    value = _lookup(row, field)
    return value if isinstance(value, str) and value.strip() else None


def _answer_text(row: dict[str, Any], fields: FieldMap) -> tuple[str, str | None]:
    """(final answer, solution text split off the answer field or None)."""
    value = _lookup(row, fields.answer)
    blank = isinstance(value, str) and not value.strip()
    if _is_null(value) or (blank and fields.answer_extraction == "boxed"):
        if fields.answer_extraction == "boxed":
            solution = _optional_text(row, fields.solution)
            boxed = last_boxed(solution) if solution else None
            if boxed:
                return boxed, None
            state = (
                "no answer field"
                if fields.answer is None
                else f"answer field {fields.answer!r} is absent, null or empty"
            )
            raise _RowError("missing_answer", f"{state} and no \\boxed{{}} in field {fields.solution!r}")
        state = "absent" if value is _MISSING else "null"
        raise _RowError("missing_answer", f"answer field {fields.answer!r} is {state}")
    if isinstance(value, bool) or not isinstance(value, str | numbers.Number):
        raise _RowError(
            "wrong_type",
            f"answer field {fields.answer!r} is {type(value).__name__}, expected string or number",
        )
    if not isinstance(value, str):
        return _number_text(value), None
    if _has_surrogates(value):
        raise _RowError("invalid_unicode", f"answer field {fields.answer!r} holds a lone surrogate")
    if fields.answer_extraction == "gsm8k_hash":
        parts = split_gsm8k_answer(value)
        if parts is not None:
            solution, final = parts
            if not final:
                raise _RowError("empty_answer", "nothing after '####' in the answer")
            return final, solution
    if not value.strip():
        raise _RowError("empty_answer", f"answer field {fields.answer!r} is empty")
    return value.strip(), None


def _metadata(row: dict[str, Any], fields: FieldMap, split_solution: str | None) -> str:
    used = {fields.question, fields.answer, fields.solution, fields.id}
    extra: dict[str, Any] = {}
    solution = _lookup(row, fields.solution)
    if split_solution is not None:
        # Original GSM8K: the answer field was "solution #### N"; keep the solution, the number is `answer`.
        extra["solution"] = split_solution
        if solution is not _MISSING:  # a solution field as well: keep it under its own name
            used.discard(fields.solution)
    elif solution is not _MISSING and solution is not None:
        extra["solution"] = solution
    source_id = _lookup(row, fields.id)
    if source_id is not _MISSING and source_id is not None:
        extra["source_id"] = source_id
    keep = fields.metadata if fields.metadata is not None else [k for k in row if k not in used]
    for name in keep:
        value = _lookup(row, name)
        if value is not _MISSING and name not in extra:
            extra[name] = value
    return raw_json(extra)


def error_row(error: str, detail: str, source: str, raw: str, key: str | None = None) -> dict[str, Any]:
    """An ``ERROR_SCHEMA`` row of this stage: ``error`` is one of :data:`ERROR_REASONS`."""
    return {"key": key, "stage": STAGE, "error": error, "error_detail": detail, "source": source, "raw": raw}


def normalise_row(row: Any, config: SourceConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One parsed record -> (problem row, None) or (None, error row). Never raises on bad data."""
    source = config.source_name
    if not isinstance(row, dict):
        detail = f"record is a {type(row).__name__}, expected a JSON object"
        return None, error_row("not_an_object", detail, source, raw_json(row))
    fields = config.fields
    key = None
    try:
        if _has_surrogates(json.dumps(row, ensure_ascii=False, default=_json_default)):
            raise _RowError("invalid_unicode", "a field holds a lone surrogate (not encodable as UTF-8)")
        question = _question_text(row, fields, config.max_question_chars)
        key = problem_id(source, question)
        answer, split_solution = _answer_text(row, fields)
        metadata = _metadata(row, fields, split_solution)
    except _RowError as err:
        return None, error_row(err.reason, err.detail, source, raw_json(row), key)
    problem = {
        "id": key,
        "question": question,
        "answer": answer,
        "source": source,
        "split": config.split,
        "metadata": metadata,
    }
    return problem, None


def normalise_rows(rows: list[dict[str, Any]], config: SourceConfig) -> tuple[list[dict], list[dict]]:
    """A batch of parsed records -> (PROBLEM_SCHEMA rows, ERROR_SCHEMA rows); ``len(rows)`` = sum of both.

    Safe inside a Ray Data ``map_batches`` stage (pure, no I/O): turn the batch into a list of dicts
    (``batch.to_pylist()`` for pyarrow) and build tables with :func:`tokenskip.schema.to_table`.
    """
    problems: list[dict] = []
    errors: list[dict] = []
    for row in rows:
        problem, error = normalise_row(row, config)
        if problem is not None:
            problems.append(problem)
        else:
            errors.append(error)
    return problems, errors


# ---------------------------------------------------------------------------------------------------------
# Reading


def _data_suffix(path: str) -> str:
    """``a/b.jsonl.gz`` -> ``.jsonl``: the suffix that names the format, under any compression suffix."""
    name = path.rsplit("/", 1)[-1]
    for compression in (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"):
        if name.endswith(compression):
            name = name[: -len(compression)]
            break
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def _file_format(path: str, config: SourceConfig) -> str:
    if config.format != "auto":
        return config.format
    suffix = _data_suffix(path)
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "json" if suffix == ".json" else "jsonl"


def _input_files(config: SourceConfig) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, _, paths = fsspec.get_fs_token_paths(config.path, storage_options=config.storage_options)
    if len(paths) == 1 and fs.isdir(paths[0]):
        paths = [p for p in fs.find(paths[0]) if _data_suffix(p) in (".jsonl", ".json", ".parquet", ".pq")]
    if not paths or (len(paths) == 1 and not fs.exists(paths[0])):
        raise FileNotFoundError(f"no input files at {config.path!r}")
    return fs, sorted(paths)


def _iter_jsonl(fs: fsspec.AbstractFileSystem, path: str, source: str) -> Iterator[RawRecord]:
    with fs.open(path, "rb", compression="infer") as handle:
        for line_no, line in enumerate(handle, start=1):
            location = f"{path}:{line_no}"
            if not line.strip():  # blank lines (e.g. a trailing newline) are not records
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                # surrogateescape keeps the exact bytes recoverable from the error row.
                raw = json.dumps(line.rstrip(b"\r\n").decode("utf-8", "surrogateescape"))
                detail = f"{location}: not UTF-8 ({err.reason} at byte {err.start})"
                yield RawRecord(location, error=error_row("invalid_unicode", detail, source, raw))
                continue
            try:
                yield RawRecord(location, row=json.loads(text))
            except json.JSONDecodeError as err:
                detail = f"{location}: invalid JSON ({err.msg} at column {err.colno})"
                yield RawRecord(
                    location, error=error_row("invalid_json", detail, source, raw_json(text.rstrip("\r\n")))
                )
            except RecursionError:
                detail = f"{location}: invalid JSON (nested too deeply)"
                yield RawRecord(
                    location, error=error_row("invalid_json", detail, source, raw_json(text.rstrip("\r\n")))
                )


def _iter_json_document(
    fs: fsspec.AbstractFileSystem, path: str, source: str, fallback_to_lines: bool
) -> Iterator[RawRecord]:
    with fs.open(path, "rb", compression="infer") as handle:
        data = handle.read()
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        if fallback_to_lines:  # a .json file that is really JSON lines
            yield from _iter_jsonl(fs, path, source)
            return
        reason = "invalid_unicode" if isinstance(err, UnicodeDecodeError) else "invalid_json"
        raw = json.dumps(data.decode("utf-8", "surrogateescape"))
        yield RawRecord(path, error=error_row(reason, f"{path}: not one JSON document ({err})", source, raw))
        return
    if isinstance(document, list):
        for index, row in enumerate(document, start=1):
            yield RawRecord(f"{path}[{index}]", row=row)
    else:
        yield RawRecord(path, row=document)


def _iter_parquet(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[RawRecord]:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                index += 1
                yield RawRecord(f"{path}#{index}", row=row)


def iter_raw_rows(config: SourceConfig) -> Iterator[RawRecord]:
    """Every input record of the source in file order, at most ``config.limit`` of them.

    A record that cannot be parsed (invalid JSON, bytes that are not UTF-8) comes back as a
    :class:`RawRecord` with ``error`` set instead of raising; an unreadable or missing file raises
    (that is a configuration problem, not a data problem).
    """
    fs, paths = _input_files(config)
    count = 0
    for path in paths:
        file_format = _file_format(path, config)
        if file_format == "parquet":
            records = _iter_parquet(fs, path)
        elif file_format == "json":
            records = _iter_json_document(
                fs, path, config.source_name, fallback_to_lines=config.format == "auto"
            )
        else:
            records = _iter_jsonl(fs, path, config.source_name)
        for record in records:
            if config.limit is not None and count >= config.limit:
                return
            count += 1
            yield record


def _same_value(value: Any, allowed: Any) -> bool:
    # As JSON values compare: 4 and 4.0 are equal, "4" and 4 are not, nor true and 1.
    if isinstance(value, bool) or isinstance(allowed, bool):
        return isinstance(value, bool) and isinstance(allowed, bool) and value == allowed
    if isinstance(value, str) or isinstance(allowed, str):
        return isinstance(value, str) and isinstance(allowed, str) and value == allowed
    return isinstance(value, numbers.Number) and value == allowed


def matches_where(row: dict[str, Any], where: dict[str, list[Any]]) -> bool:
    """Whether ``row`` holds one of the allowed values in every field of ``where`` (an absent field
    never matches)."""
    for field, allowed in where.items():
        value = _lookup(row, field)
        if value is _MISSING or not any(_same_value(value, a) for a in allowed):
            return False
    return True


@dataclass(frozen=True)
class LoadedSource:
    """A whole source, loaded: ``input records = problems + errors + filtered_out``."""

    problems: pa.Table
    """``PROBLEM_SCHEMA`` rows."""
    errors: pa.Table
    """``ERROR_SCHEMA`` rows: records that could not become problems."""
    filtered_out: int
    """Well-formed records the source's ``where`` did not select (counted, not errors)."""


def load_source(config: SourceConfig) -> LoadedSource:
    """Load a whole source. A bad record never stops the load; error details start with the file and
    line (``path:line``, or ``path#row`` for parquet). A record that is an object but does not match
    ``config.where`` is counted in ``filtered_out`` and not looked at further (a record of another
    difficulty is not an error, even when it would be malformed)."""
    problems: list[dict] = []
    errors: list[dict] = []
    filtered_out = 0
    for record in iter_raw_rows(config):
        if record.error is not None:
            errors.append(record.error)
            continue
        selected = (
            config.where is None
            or not isinstance(record.row, dict)
            or matches_where(record.row, config.where)
        )
        if not selected:
            filtered_out += 1
            continue
        problem, error = normalise_row(record.row, config)
        if problem is not None:
            problems.append(problem)
        else:
            errors.append({**error, "error_detail": f"{record.location}: {error['error_detail']}"})
    return LoadedSource(to_table(problems, PROBLEM_SCHEMA), to_table(errors, ERROR_SCHEMA), filtered_out)


def load_problems(config: SourceConfig) -> tuple[pa.Table, pa.Table]:
    """Load a whole source: (problems with ``PROBLEM_SCHEMA``, errors with ``ERROR_SCHEMA``), as
    :func:`load_source` without the count of records ``where`` filtered out."""
    loaded = load_source(config)
    return loaded.problems, loaded.errors
