"""Read prompts from the files people keep them in: txt, csv, tsv, jsonl, json, parquet.

Errors name the file and, for line-oriented formats, the line, so a broken row in a
100k-prompt file is found in seconds rather than by bisecting.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from stepsaver.errors import StepsaverError

PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts", "prompts", "caption", "text", "Text")
FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".json", ".parquet")


def _pick_column(columns: list[str], column: str | None, path: Path, where: str = "") -> str:
    at = f"{path}, {where}" if where else str(path)
    if column is not None:
        if column not in columns:
            raise StepsaverError(f"{at}: no column {column!r}; columns are {columns}")
        return column
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise StepsaverError(f"{at}: no prompt column found among {columns}; name one with --column")


def _prompt_of(obj: object, column: str | None, path: Path, where: str) -> str:
    """The prompt of one JSON/JSONL item: a string, or an object's prompt column holding a string."""
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise StepsaverError(f"{path}, {where}: expected a string or an object, got {type(obj).__name__}")
    value = obj[_pick_column(list(obj), column, path, where)]
    if not isinstance(value, str):
        raise StepsaverError(f"{path}, {where}: the prompt is {json.dumps(value)[:40]}, not a string; "
                             "fix or remove that row")
    return value


def _read_delimited(path: Path, column: str | None, delimiter: str) -> list[str]:
    # CSV: strict, so a quote left open to the end of the file is an error instead of one huge field
    # that silently swallows every row after it. TSV (PartiPrompts): quotes are literal text, as
    # tab-separated files write them (a prompt may quote a sign's text), so nothing can be swallowed.
    with path.open(newline="", encoding="utf-8") as f:
        quoting = {"quoting": csv.QUOTE_NONE} if delimiter == "\t" else {"strict": True}
        reader = csv.reader(f, delimiter=delimiter, **quoting)
        try:
            try:
                header = next(reader)
            except StopIteration:
                return []
            idx = header.index(_pick_column(header, column, path))
            out = []
            for row in reader:
                if not row:
                    continue
                if len(row) <= idx:
                    raise StepsaverError(f"{path}, line {reader.line_num}: {len(row)} fields, expected at least "
                                         f"{idx + 1} (header has {len(header)})")
                out.append(row[idx])
        except csv.Error as exc:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise StepsaverError(f"{path}, line {reader.line_num}: unreadable {kind} ({exc}); check for an unclosed "
                                 "quote or an oversized field") from None
        return out


def _read_jsonl(path: Path, column: str | None) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StepsaverError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
            out.append(_prompt_of(obj, column, path, f"line {lineno}"))
    return out


def _read_parquet(path: Path, column: str | None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise StepsaverError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
    values = table.column(_pick_column(table.column_names, column, path)).to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise StepsaverError(f"{path}, row {row}: the prompt is {value!r}, not a string; fix or remove that row")
    return values


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts of a file, stripped, empty ones dropped, order kept (duplicates kept too)."""
    path = Path(path)
    if not path.is_file():
        raise StepsaverError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            raw = path.read_text(encoding="utf-8").splitlines()
        elif suffix in (".csv", ".tsv"):
            raw = _read_delimited(path, column, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".jsonl":
            raw = _read_jsonl(path, column)
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise StepsaverError(f"{path}: expected a JSON list of prompts or objects")
            raw = [_prompt_of(d, column, path, f"item {i}") for i, d in enumerate(data)]
        elif suffix == ".parquet":
            raw = _read_parquet(path, column)
        else:
            raise StepsaverError(f"{path}: unknown prompts format {suffix!r}; use one of {', '.join(FORMATS)}")
    except UnicodeDecodeError as exc:
        raise StepsaverError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise StepsaverError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    return [p.strip() for p in raw if p and p.strip()]
