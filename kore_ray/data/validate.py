"""`kore validate FILE`: check a data file against its schema and list every bad row."""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path
from typing import TextIO

from kore_ray.data.io import iter_raw_rows, iter_rows
from kore_ray.data.schemas import (
    Conversation,
    EvalQuestion,
    KnowledgeItem,
    LlavaEntry,
    Record,
    RetentionProbe,
)
from kore_ray.errors import InputError

KINDS: dict[str, type[Record]] = {
    "knowledge": KnowledgeItem,
    "question": EvalQuestion,
    "retention": RetentionProbe,
    "conversation": Conversation,
    "llava": LlavaEntry,
}

_DETECT_ROWS = 50  # enough to step over a few malformed rows at the top of a file


def _kinds_fitting(keys: set[str]) -> list[str]:
    """Kinds whose required fields are all in `keys` and which know every key (if strict)."""
    fits = []
    for kind, cls in KINDS.items():
        fields = cls.model_fields
        required = {name for name, info in fields.items() if info.is_required()}
        strict = cls.model_config.get("extra") == "forbid"
        if required <= keys and not (strict and keys - fields.keys()):
            fits.append(kind)
    return fits


def detect_kind(path: str | Path) -> str:
    """Tell a file's kind (a key of KINDS) from the field names of its first rows.

    Field names, not full validation, so that a file whose rows are all bad in their values
    is still checked against the right schema. Rows that fit no kind, or several, are skipped.
    """
    first_line: dict[str, int] = {}  # kind -> first line that fits only that kind
    for line, raw in islice(iter_raw_rows(path), _DETECT_ROWS):
        if isinstance(raw, dict):
            fits = _kinds_fitting(set(raw))
            if len(fits) == 1:
                first_line.setdefault(fits[0], line)
    if len(first_line) == 1:
        return next(iter(first_line))
    hint = f"pass --kind ({'|'.join(KINDS)})"
    if not first_line:
        raise InputError(f"{path}: cannot tell the kind of rows from their fields; {hint}")
    seen = ", ".join(f"{kind} (line {line})" for kind, line in first_line.items())
    raise InputError(f"{path}: rows of different kinds: {seen}; {hint}")


def validate_file(path: str | Path, kind: str | None = None, out: TextIO | None = None) -> int:
    """Print every bad row of `path` and a summary line to `out` (default stdout).

    Returns the exit code: 0 all rows good, 1 some rows bad, 2 the file cannot be read
    (missing, empty, wrong type, not JSON) or its kind cannot be told.
    """
    out = out or sys.stdout
    total = bad = 0
    try:
        kind = kind or detect_kind(path)
        if kind not in KINDS:
            raise InputError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        for row in iter_rows(path, KINDS[kind]):
            total += 1
            bad += bool(row.errors)
            for error in row.errors:
                print(error, file=out)
    except InputError as e:
        print(f"error: {e}", file=out)
        return 2
    if bad:
        print(f"{bad} bad rows of {total} {kind} rows", file=out)
        return 1
    print(f"OK: {total} {kind} rows", file=out)
    return 0
