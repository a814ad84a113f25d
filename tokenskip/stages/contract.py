"""What a stage requires and produces: checked once for the whole chain at plan time, and on every
batch where it arrives.

Stages hand each other Arrow tables; a field one stage stops producing (or renames) would otherwise
surface as a ``KeyError`` or a null column several stages later, after the engines have started.
Each stage module declares its :class:`StageContract` (``CONTRACT``): the fields it reads and the
fields it hands on. :func:`check_chain` walks the run's stages in order before anything starts (the
plan, ``--dry-run``); :func:`check_fields` checks each batch against the same declared inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa


class StageContractError(ValueError):
    """A batch does not hold what its stage requires (fields, or rows per problem)."""


class RowCountMismatch(StageContractError):
    """A problem did not yield exactly ``n`` sample rows: its shard could never be committed whole."""


class StageChainError(StageContractError):
    """A stage requires a field that no earlier stage of the chain produces (with its type)."""


@dataclass(frozen=True)
class StageContract:
    """A stage's declared interface. ``inputs``: the fields it reads (a batch may hold more).
    ``outputs``: the fields it produces; with ``passes_through`` every input column goes on too,
    before them, otherwise ``outputs`` is the stage's whole output schema."""

    name: str
    inputs: pa.Schema
    outputs: pa.Schema
    passes_through: bool = False

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """The schema of what the stage hands on, given a batch of ``input_schema``."""
        if self.passes_through:
            return pa.schema(list(input_schema) + list(self.outputs))
        return self.outputs


@dataclass(frozen=True)
class ChainLink:
    """One stage of a checked chain: its contract and the schema of the rows it receives."""

    contract: StageContract
    received: pa.Schema

    @property
    def handed_on(self) -> pa.Schema:
        return self.contract.output_schema(self.received)

    def describe(self) -> str:
        """``reads a, b -> adds c; drops d``: what the stage takes from and changes in the rows."""
        received, out, inputs = self.received.names, self.handed_on, self.contract.inputs.names
        reads = f"all {len(received)} fields" if set(inputs) == set(received) else ", ".join(inputs)
        added = [f.name for f in out if self.received.get_field_index(f.name) < 0]
        dropped = [name for name in received if out.get_field_index(name) < 0]
        if len(out) <= len(dropped):  # a new kind of row: name it whole
            return f"reads {reads} -> hands on {', '.join(out.names)}"
        return f"reads {reads} -> adds {', '.join(added) or 'nothing'}" + (
            f"; drops {', '.join(dropped)}" if dropped else ""
        )


def _mismatches(schema: pa.Schema, fields: Sequence[pa.Field]) -> list[str]:
    problems = []
    for field in fields:
        index = schema.get_field_index(field.name)
        if index < 0:
            problems.append(f"{field.name!r} is missing")
        elif not schema.field(index).type.equals(field.type):
            problems.append(f"{field.name!r} is {schema.field(index).type}, expected {field.type}")
    return problems


def check_fields(schema: pa.Schema, fields: Sequence[pa.Field], stage: str) -> None:
    """Raise :class:`StageContractError` naming every field of ``fields`` that ``schema`` lacks or
    holds with another type (nullability and metadata are not compared)."""
    problems = _mismatches(schema, fields)
    if problems:
        raise StageContractError(
            f"{stage} stage: the batch does not match the stage's input fields: {'; '.join(problems)} "
            f"(batch columns: {schema.names})"
        )


def check_chain(source: str, rows: pa.Schema, stages: Sequence[StageContract]) -> list[ChainLink]:
    """Walk ``stages`` in order from ``rows`` (what ``source`` feeds the first stage): each stage's
    declared inputs must be among what the stages before it hand on. Returns the links (what each
    stage receives); raises :class:`StageChainError`, one line, at the first stage that does not fit."""
    links, made_by = [], source
    for contract in stages:
        problems = _mismatches(rows, contract.inputs)
        if problems:
            raise StageChainError(
                f"stage chain: {contract.name} needs what {made_by} does not hand on: {'; '.join(problems)} "
                f"(it hands on: {', '.join(rows.names)})"
            )
        link = ChainLink(contract, rows)
        links.append(link)
        rows, made_by = link.handed_on, contract.name
    return links
