"""Low-level reading for the loaders: strict UTF-8 decoding, CSV/JSONL records with
their 1-based line numbers, value parsing, and :class:`DataError`.

Kept apart from :mod:`mer_ray.data.loaders` so that module reads as the two
loaders and the summary.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mer_ray.data.labels import LabelSet

_TIME = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?$")


class DataError(ValueError):
    """Bad input data. ``path``, ``row`` (1-based line or record), ``column`` and ``value`` say where."""

    def __init__(self, reason: str, path: str | Path, row: int | None = None, *, row_kind: str = "line",
                 column: str | None = None, value: Any = None, hint: str = ""):
        self.reason, self.path, self.row, self.column, self.value = reason, str(path), row, column, value
        where = f"{path}" + (f", {row_kind} {row}" if row is not None else "")
        col = f" in column {column!r}" if column is not None else ""
        val = f": {value!r}" if value is not None else ""
        super().__init__(f"{where}: {reason}{col}{val}" + (f" ({hint})" if hint else ""))


# --------------------------------------------------------------------------- value parsing
def parse_time(value: Any) -> float | None:
    """Seconds from a number or an ``H:MM:SS,mmm`` / ``HH:MM:SS.mmm`` string; None for empty. Raises ValueError."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        m = _TIME.match(text)
        if m:
            h, mi, s, frac = m.groups()
            if int(mi) >= 60 or int(s) >= 60:
                raise ValueError("not a time")
            seconds = int(h) * 3600 + int(mi) * 60 + int(s) + (float("0." + frac) if frac else 0.0)
        else:
            seconds = float(text)  # plain seconds; raises ValueError otherwise
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("not a time")
    return seconds


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError("not an integer")


def parse_float(value: Any) -> float | None:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a number")
    out = float(value)
    if math.isnan(out):
        return None
    if not math.isfinite(out):
        raise ValueError("not a number")
    return out


def decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"bad encoding: not UTF-8 at byte offset {e.start}", path, line,
                        value=data[e.start: e.start + 8]) from None


# --------------------------------------------------------------------------- record readers
def csv_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(decode(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("empty file, no header", path, 1) from None
    if len(set(header)) != len(header):
        dup = next(h for h, c in Counter(header).items() if c > 1)
        raise DataError("duplicate column in header", path, 1, value=dup)

    def rows():
        prev = reader.line_num
        for fields in reader:
            line, prev = prev + 1, reader.line_num
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise DataError(f"row has {len(fields)} fields, header has {len(header)}", path, line, value=fields)
            yield line, dict(zip(header, fields))

    return header, rows()


def jsonl_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    records, columns = [], {}
    for line_no, line in enumerate(decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"bad JSON ({e.msg})", path, line_no, value=line[:80]) from None
        if not isinstance(rec, dict):
            raise DataError("a JSONL record must be an object", path, line_no, value=line[:80])
        columns.update(dict.fromkeys(rec))
        records.append((line_no, rec))
    return list(columns), records


def check_columns(columns: list[str], needed, path: Path, row_kind: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError("missing column", path, 1 if row_kind == "line" else None,
                        value=missing[0] if len(missing) == 1 else missing, hint=f"found {list(columns)}")


def check_label(value, labels: LabelSet | None, path, row, row_kind, column) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError("label is not a string", path, row, row_kind=row_kind, column=column, value=value)
    if labels is not None and value not in labels.labels:
        raise DataError("unknown label", path, row, row_kind=row_kind, column=column, value=value,
                        hint=f"label set {labels.name!r}: {list(labels.labels)}")
    return value
