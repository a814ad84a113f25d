"""The vendored test fixtures in tests/data (README.md there says where each file comes from).

The files are gzipped JSON lines; ``load_problems`` reads them as they are (it infers the compression
from the name), and :func:`read_jsonl` is how a test reads their rows itself.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def read_text(path: Path) -> str:
    """A fixture file's text (gunzipped if its name ends in .gz)."""
    raw = Path(path).read_bytes()
    return (gzip.decompress(raw) if str(path).endswith(".gz") else raw).decode("utf-8")


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines fixture, in file order (split at newlines only, as JSON lines are)."""
    return [json.loads(line) for line in read_text(path).split("\n") if line.strip()]
