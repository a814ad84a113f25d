"""What a stage requires of a batch, checked where the batch arrives.

Stages hand each other Arrow tables; a field one stage stops producing (or renames) would otherwise
surface as a ``KeyError`` or a null column several stages later. Each stage module declares its
input fields and calls :func:`check_fields` on every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa


class StageContractError(ValueError):
    """A batch does not hold what its stage requires (fields, or rows per problem)."""


class RowCountMismatch(StageContractError):
    """A problem did not yield exactly ``n`` sample rows: its shard could never be committed whole."""


def check_fields(schema: pa.Schema, fields: Sequence[pa.Field], stage: str) -> None:
    """Raise :class:`StageContractError` naming every field of ``fields`` that ``schema`` lacks or
    holds with another type (nullability and metadata are not compared)."""
    problems = []
    for field in fields:
        index = schema.get_field_index(field.name)
        if index < 0:
            problems.append(f"{field.name!r} is missing")
        elif not schema.field(index).type.equals(field.type):
            problems.append(f"{field.name!r} is {schema.field(index).type}, expected {field.type}")
    if problems:
        raise StageContractError(
            f"{stage} stage: the batch does not match the stage's input fields: {'; '.join(problems)} "
            f"(batch columns: {schema.names})"
        )
