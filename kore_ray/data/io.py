"""Readers and writers for data files: JSONL, a JSON list, or Parquet.

Readers check every row and report every problem at once, as `file:line: field: message`,
so a user fixes a file in one pass. `line` is the 1-based line of a JSONL file, and the
1-based record number in a JSON list or a Parquet file. A file that cannot be read at all
(missing, empty, unsupported type, not JSON) raises InputError straight away.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from kore_ray.data.schemas import JSON_FIELD, Conversation, LlavaEntry, Record
from kore_ray.errors import InputError

SUFFIXES = (".jsonl", ".json", ".parquet")

R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class RowError:
    file: str
    line: int
    field: str  # "(row)" for a problem with the row as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class Row(NamedTuple):
    line: int
    record: Record | None  # None when the row has errors
    errors: list[RowError]


def iter_raw_rows(path: str | Path) -> Iterator[tuple[int, dict | RowError]]:
    """Yield (line, row dict), or (line, RowError) for a row that is not a JSON object.

    Parquet nulls are dropped (a null is an absent optional field) and JSON-encoded columns
    (see schemas.JSON_FIELD) are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    rows = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}[path.suffix]
    empty = True
    for line, row in rows(path):
        empty = False
        if not isinstance(row, (dict, RowError)):
            row = RowError(str(path), line, "(row)", f"expected an object, got {_json_type(row)}")
        yield line, row
    if empty:
        raise InputError(f"{path}: empty file (no rows)")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    # utf-8-sig: a byte-order mark (Notepad, Excel's "UTF-8 CSV" habits) is not data. Windows
    # line ends need nothing: text mode reads them as newlines.
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as e:
                    yield line, RowError(str(path), line, "(row)", f"not valid JSON: {e.msg}")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of objects, got {_json_type(data)}")
    yield from enumerate(data, 1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        file = pq.ParquetFile(path)
        json_cols = [f.name for f in file.schema_arrow if _is_json_field(f)]
        line = 0
        for batch in file.iter_batches():
            for row in batch.to_pylist():
                line += 1
                yield line, _decode_json_cols(path, line, _drop_nulls(row), json_cols)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None


def _is_json_field(field: pa.Field) -> bool:
    return JSON_FIELD.items() <= (field.metadata or {}).items()


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _decode_json_cols(path: Path, line: int, row: dict, cols: list[str]) -> dict | RowError:
    for col in cols:
        if isinstance(row.get(col), str):
            try:
                row[col] = json.loads(row[col])
            except json.JSONDecodeError as e:
                return RowError(str(path), line, col, f"not valid JSON: {e.msg}")
    return row


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number",
               float: "a number", bool: "true/false", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _field(loc: tuple) -> str:
    """("qa", 0, "answer") -> "qa[0].answer"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(row)"


def iter_rows(
    path: str | Path, model_cls: type[R], base_dir: str | Path | None = None
) -> Iterator[Row]:
    """Validate every row of `path` against `model_cls`, including duplicate ids.

    Relative image paths resolve against `base_dir` (default: the data file's folder) and
    must exist.
    """
    path = Path(path)
    context = {"base_dir": Path(base_dir) if base_dir is not None else path.parent}
    first_line: dict[str, int] = {}
    for line, raw in iter_raw_rows(path):
        if isinstance(raw, RowError):
            yield Row(line, None, [raw])
            continue
        record, errors = None, []
        try:
            record = model_cls.model_validate(raw, context=context)
        except ValidationError as e:
            errors = [
                RowError(str(path), line, _field(err["loc"]), err["msg"])
                for err in e.errors(include_url=False)
            ]
        raw_id = raw.get("id")
        if isinstance(raw_id, (str, int)) and str(raw_id).strip():
            key = str(raw_id).strip()
            if key in first_line:
                msg = f"duplicate id {key!r} (first at line {first_line[key]})"
                errors.append(RowError(str(path), line, "id", msg))
            else:
                first_line[key] = line
        yield Row(line, None if errors else record, errors)


def iter_row_errors(
    path: str | Path, model_cls: type[Record], base_dir: str | Path | None = None
) -> Iterator[RowError]:
    """Every problem in `path`, one RowError each (see iter_rows)."""
    for row in iter_rows(path, model_cls, base_dir):
        yield from row.errors


def read_records(
    path: str | Path, model_cls: type[R], base_dir: str | Path | None = None
) -> list[R]:
    """All rows of `path` as `model_cls` records; one InputError listing every bad row."""
    records, errors, bad = [], [], 0
    for row in iter_rows(path, model_cls, base_dir):
        if row.errors:
            bad += 1
            errors += row.errors
        else:
            records.append(row.record)
    if errors:
        listing = "\n".join(map(str, errors))
        raise InputError(f"{path}: {bad} bad row(s) of {len(records) + bad}:\n{listing}")
    return records


def read_parquet(path: str | Path, model_cls: type[R]) -> list[R]:
    """Read a Parquet file (as written by write_parquet), checking it like read_records."""
    if Path(path).suffix != ".parquet":
        raise InputError(f"{path}: expected a .parquet file")
    return read_records(path, model_cls)


def write_parquet(
    records: Sequence[Record], path: str | Path, model_cls: type[Record] | None = None
) -> Path:
    """Write records of one type to Parquet atomically: readers see the old file or the new.

    `model_cls` is needed only for an empty list.
    """
    if model_cls is None:
        if not records:
            raise ValueError("write_parquet needs model_cls to write an empty list")
        model_cls = type(records[0])
    if any(type(r) is not model_cls for r in records):
        raise TypeError(f"write_parquet: all records must be {model_cls.__name__}")
    schema = model_cls.arrow_schema()
    json_cols = [f.name for f in schema if _is_json_field(f)]
    rows = []
    for record in records:
        row = record.model_dump(mode="json", by_alias=True, exclude_none=True)
        for col in json_cols:
            if col in row:
                row[col] = json.dumps(row[col], ensure_ascii=False)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=schema)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def import_llava(path: str | Path, image_root: str | Path | None = None) -> list[Conversation]:
    """Convert a LLaVA-style conversation file to Conversations (task "imported").

    Roles human/gpt become user/assistant and each `<image>` token an {"type": "image"} part.
    Relative image paths resolve against `image_root` (default: the file's folder), as LLaVA
    keeps images apart from the JSON.
    """
    return [entry.to_conversation() for entry in read_records(path, LlavaEntry, image_root)]


def load_image(ref: str):
    """An RGB PIL image from a local path or an object-store URI (s3://, gs://, ...)."""
    from PIL import Image

    try:
        if "://" in ref and not ref.startswith("file://"):
            import pyarrow.fs as pafs

            fs, where = pafs.FileSystem.from_uri(ref)
            with fs.open_input_file(where) as f:
                data = io.BytesIO(f.read())
        else:
            data = ref.removeprefix("file://")
        with Image.open(data) as image:
            return image.convert("RGB")
    except Exception as e:
        raise InputError(f"cannot read image {ref}: {type(e).__name__}: {e}") from e
