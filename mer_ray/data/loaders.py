"""Loaders: MELD's CSVs and a generic CSV/JSONL/Parquet manifest -> one Arrow table.

Every loader returns a table that follows :data:`mer_ray.data.schema.SCHEMA`
(all schema columns present, null where a dataset lacks them), followed by any
extra columns, sorted by ``(dialogue_id, turn)``. Bad input stops the load with
a :class:`DataError` naming the file, the row and the value; nothing is dropped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from mer_ray.data.labels import LabelSet, get_label_set
from mer_ray.data.schema import OPTIONAL, REQUIRED, SCHEMA

log = logging.getLogger(__name__)

MELD_SPLITS = ("train", "dev", "test")
#: MELD CSV column -> schema column. These must all be present.
MELD_COLUMNS = {"Dialogue_ID": "dialogue_id", "Utterance_ID": "turn", "Speaker": "speaker", "Utterance": "text",
                "Emotion": "label", "Sentiment": "sentiment", "StartTime": "episode_start", "EndTime": "episode_end"}
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


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError("not an integer")


def _parse_float(value: Any) -> float | None:
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


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"bad encoding: not UTF-8 at byte offset {e.start}", path, line,
                        value=data[e.start: e.start + 8]) from None


# --------------------------------------------------------------------------- record readers
def _csv_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
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


def _jsonl_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    records, columns = [], {}
    for line_no, line in enumerate(_decode(path).splitlines(), 1):
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


# --------------------------------------------------------------------------- table building
def _check_columns(columns: list[str], needed, path: Path, row_kind: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError("missing column", path, 1 if row_kind == "line" else None,
                        value=missing[0] if len(missing) == 1 else missing, hint=f"found {list(columns)}")


def _finish(rows: dict[str, list], path: Path, row_nums: list[int], row_kind: str,
            extra: dict[str, pa.Array] | None = None) -> pa.Table:
    """Check (dialogue_id, turn) uniqueness, build the typed table and sort it."""
    seen: dict[tuple[str, int], int] = {}
    for i, key in enumerate(zip(rows["dialogue_id"], rows["turn"])):
        if key in seen:
            raise DataError(f"duplicate (dialogue_id, turn), first at {row_kind} {seen[key]}", path, row_nums[i],
                            row_kind=row_kind, value=key)
        seen[key] = row_nums[i]
    n = len(row_nums)
    arrays = {f.name: pa.array(rows.get(f.name, [None] * n), type=f.type) for f in SCHEMA}
    for name, values in rows.items():
        if name not in arrays:
            arrays[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    for name, arr in (extra or {}).items():
        arrays.setdefault(name, arr)
    table = pa.table(arrays)
    return table.sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])


def _label_set(spec: str | LabelSet | None) -> LabelSet | None:
    return get_label_set(spec) if isinstance(spec, str) else spec


def _check_label(value, labels: LabelSet | None, path, row, row_kind, column) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError("label is not a string", path, row, row_kind=row_kind, column=column, value=value)
    if labels is not None and value not in labels.labels:
        raise DataError("unknown label", path, row, row_kind=row_kind, column=column, value=value,
                        hint=f"label set {labels.name!r}: {list(labels.labels)}")
    return value


def load_meld(data_dir: str | Path, split: str) -> pa.Table:
    """Load one MELD split from ``{data_dir}/{split}_sent_emo.csv``.

    Args:
        data_dir: a directory holding MELD's ``{train,dev,test}_sent_emo.csv``.
        split: ``train``, ``dev`` or ``test``.

    Returns:
        The schema's columns plus ``split``, ``season``, ``episode``, ``sr_no``,
        ``episode_start`` and ``episode_end`` (seconds in the episode). ``dialogue_id`` is
        ``"{split}/{Dialogue_ID}"``, ``turn`` is ``Utterance_ID`` (gaps kept), ``video`` is
        the clip name ``dia{D}_utt{U}.mp4``; ``start``/``end`` (offsets into the clip) are null.
    """
    if split not in MELD_SPLITS:
        raise ValueError(f"unknown MELD split {split!r}; expected one of {list(MELD_SPLITS)}")
    path = Path(data_dir) / f"{split}_sent_emo.csv"
    if not path.is_file():
        raise FileNotFoundError(f"MELD file not found: {path}")
    header, records = _csv_records(path)
    _check_columns(header, MELD_COLUMNS, path, "line")
    emotions, sentiments = get_label_set("meld7"), get_label_set("meld_sentiment3")
    cols = ["dialogue_id", "turn", "speaker", "text", "video", "label", "sentiment", "split", "season",
            "episode", "sr_no", "episode_start", "episode_end"]
    rows: dict[str, list] = {c: [] for c in cols}
    line_nums = []
    for line, rec in records:
        def bad(reason, column):
            return DataError(reason, path, line, column=column, value=rec[column])

        try:
            dia = _parse_int(rec["Dialogue_ID"])
        except ValueError:
            raise bad("Dialogue_ID is not an integer", "Dialogue_ID") from None
        try:
            utt = _parse_int(rec["Utterance_ID"])
        except ValueError:
            raise bad("non-integer turn", "Utterance_ID") from None
        times = []
        for col in ("StartTime", "EndTime"):
            try:
                t = parse_time(rec[col])
            except ValueError:
                t = None
            if t is None:
                raise bad("bad time", col)
            times.append(t)
        if times[1] < times[0]:
            raise bad(f"bad time: ends before StartTime {rec['StartTime']!r}", "EndTime")
        extras = {}
        for col, name in (("Season", "season"), ("Episode", "episode"), ("Sr No.", "sr_no")):
            try:
                extras[name] = _parse_int(rec[col]) if rec.get(col, "") != "" else None
            except ValueError:
                raise bad(f"{col} is not an integer", col) from None
        label = _check_label(rec["Emotion"], emotions, path, line, "line", "Emotion")
        sentiment = _check_label(rec["Sentiment"], sentiments, path, line, "line", "Sentiment")
        if label is None or sentiment is None:
            raise bad("missing gold label", "Emotion" if label is None else "Sentiment")
        values = [f"{split}/{dia}", utt, rec["Speaker"], rec["Utterance"], f"dia{dia}_utt{utt}.mp4", label,
                  sentiment, split, extras["season"], extras["episode"], extras["sr_no"], *times]
        for c, v in zip(cols, values):
            rows[c].append(v)
        line_nums.append(line)
    for c in ("season", "episode", "sr_no"):
        rows[c] = pa.array(rows[c], type=pa.int64())
    table = _finish(rows, path, line_nums, "line")
    log.info("loaded MELD %s from %s: %s", split, path, json.dumps(summarize(table)))
    return table


def load_manifest(path: str | Path, label_set: str | LabelSet | None = None,
                  sentiment_set: str | LabelSet | None = None) -> pa.Table:
    """Load a generic manifest (``.csv``, ``.jsonl``/``.ndjson`` or ``.parquet``) with the schema's columns.

    Args:
        path: the manifest file; the format comes from its suffix.
        label_set: if given, every non-null ``label`` must belong to it (else nothing is validated).
        sentiment_set: likewise for ``sentiment``.

    Returns:
        The schema's columns (null where absent) plus every extra column, sorted by
        ``(dialogue_id, turn)``. Paths in ``video``/``audio`` are kept as written (not resolved).
        Empty cells in optional CSV columns and NaN in float columns read as null; a null
        ``text`` reads as the empty string (counted by :func:`summarize`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    extra_arrays: dict[str, pa.Array] | None = None
    if suffix == ".csv":
        columns, records, row_kind = *_csv_records(path), "line"
    elif suffix in (".jsonl", ".ndjson"):
        columns, records, row_kind = *_jsonl_records(path), "line"
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            src = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is bad input
            raise DataError(f"cannot read Parquet ({e})", path) from None
        columns, row_kind = src.column_names, "record"
        records = enumerate(src.select([c for c in columns if c in SCHEMA.names]).to_pylist(), 1)
        extra_arrays = {c: src[c] for c in columns if c not in SCHEMA.names}
    else:
        raise DataError("unknown manifest format; expected .csv, .jsonl or .parquet", path, value=path.suffix)
    _check_columns(list(columns), REQUIRED, path, row_kind)
    labels = {"label": _label_set(label_set), "sentiment": _label_set(sentiment_set)}
    keep = [c for c in columns if extra_arrays is None or c in SCHEMA.names]
    rows: dict[str, list] = {c: [] for c in keep}
    row_nums = []
    for row, rec in records:
        def bad(reason, column):
            return DataError(reason, path, row, row_kind=row_kind, column=column, value=rec.get(column))

        out = {}
        for col in keep:
            v = rec.get(col)
            if col == "turn":
                if v is None or v == "":
                    raise bad("missing value", col)
                try:
                    v = _parse_int(v)
                except ValueError:
                    raise bad("non-integer turn", col) from None
            elif col in ("dialogue_id", "speaker"):
                if v is None or (col == "dialogue_id" and v == ""):
                    raise bad("missing value", col)
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise bad("expected a string", col)
                v = str(v)
            elif col == "text":
                if v is not None and not isinstance(v, str):
                    raise bad("expected a string", col)
                v = v or ""
            elif col in ("start", "end"):
                try:
                    v = parse_time(v)
                except ValueError:
                    raise bad("bad time", col) from None
            elif col in ("label", "sentiment"):
                v = _check_label(v, labels[col], path, row, row_kind, col)
            elif col in ("valence", "arousal", "dominance"):
                try:
                    v = _parse_float(v)
                except ValueError:
                    raise bad("not a number", col) from None
            elif col in OPTIONAL and v == "":  # video/audio: empty CSV cell -> null
                v = None
            out[col] = v
        if out.get("start") is not None and out.get("end") is not None and out["end"] < out["start"]:
            raise bad(f"bad time: end before start {out['start']}", "end")
        for col in keep:
            rows[col].append(out[col])
        row_nums.append(row)
    for col in [c for c in keep if c not in SCHEMA.names]:
        try:
            rows[col] = pa.array(rows[col])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"mixed value types ({e})", path, column=col) from None
    table = _finish(rows, path, row_nums, row_kind, extra_arrays)
    log.info("loaded manifest %s: %s", path, json.dumps(summarize(table)))
    return table


def summarize(table: pa.Table) -> dict:
    """Counts for a loaded table (JSON-ready): utterances, dialogues, empty texts, per label/sentiment, turn gaps."""
    dialogues: dict[str, list[int]] = {}
    for d, t in zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist()):
        dialogues.setdefault(d, []).append(t)
    lengths = [len(v) for v in dialogues.values()]
    base = min((min(v) for v in dialogues.values()), default=0)  # 0 for MELD; 1 for 1-based manifests
    texts = table["text"].to_pylist()
    out = {
        "utterances": table.num_rows,
        "dialogues": len(dialogues),
        "empty_texts": sum(1 for t in texts if not (t or "").strip()),
        "speakers": len(set(table["speaker"].to_pylist())),
        # turns not exactly base..base+n-1 (MELD: a missing Utterance_ID, leading ones included)
        "dialogues_with_turn_gaps": sum(1 for v in dialogues.values() if sorted(v) != list(range(base, base + len(v)))),
        "max_dialogue_len": max(lengths, default=0),
        "mean_dialogue_len": round(sum(lengths) / len(lengths), 3) if lengths else 0.0,
    }
    for col, key in (("label", "labels"), ("sentiment", "sentiments"), ("split", "splits")):
        if col in table.column_names:
            counts = Counter(table[col].to_pylist())
            out[key] = {("null" if k is None else k): v for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    return out
