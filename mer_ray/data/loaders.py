"""Loaders: MELD's CSVs and a generic CSV/JSONL/Parquet manifest -> one Arrow table.

Every loader returns a table that follows :data:`mer_ray.data.schema.SCHEMA`
(all schema columns present, null where a dataset lacks them), followed by any
extra columns, sorted by ``(dialogue_id, turn)``. Bad input stops the load with
a :class:`DataError` naming the file, the row and the value; nothing is dropped.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa

from mer_ray.data.labels import LabelSet, get_label_set
from mer_ray.data.readers import DataError, check_columns, check_label, csv_records, jsonl_records, parse_float, parse_int, parse_time
from mer_ray.data.schema import OPTIONAL, REQUIRED, SCHEMA

__all__ = ["DataError", "MELD_SPLITS", "load_manifest", "load_meld", "parse_time", "summarize"]

log = logging.getLogger(__name__)

MELD_SPLITS = ("train", "dev", "test")
#: Environment variable naming the MELD directory when no --data-dir is given.
MELD_ENV = "MER_MELD_DIR"


def meld_dir(path: str | Path | None = None) -> Path:
    """The MELD directory: ``path`` if given, else ``$MER_MELD_DIR``; there is no built-in default."""
    import os

    path = path or os.environ.get(MELD_ENV)
    if not path:
        raise DataError(f"no MELD directory: pass --data-dir (or data.meld_dir) or set {MELD_ENV}")
    return Path(path)
#: MELD CSV column -> schema column. These must all be present.
MELD_COLUMNS = {"Dialogue_ID": "dialogue_id", "Utterance_ID": "turn", "Speaker": "speaker", "Utterance": "text",
                "Emotion": "label", "Sentiment": "sentiment", "StartTime": "episode_start", "EndTime": "episode_end"}


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
    header, records = csv_records(path)
    check_columns(header, MELD_COLUMNS, path, "line")
    emotions, sentiments = get_label_set("meld7"), get_label_set("meld_sentiment3")
    cols = ["dialogue_id", "turn", "speaker", "text", "video", "label", "sentiment", "split", "season",
            "episode", "sr_no", "episode_start", "episode_end"]
    rows: dict[str, list] = {c: [] for c in cols}
    line_nums = []
    for line, rec in records:
        def bad(reason, column, line=line, rec=rec):
            return DataError(reason, path, line, column=column, value=rec[column])

        try:
            dia = parse_int(rec["Dialogue_ID"])
        except ValueError:
            raise bad("Dialogue_ID is not an integer", "Dialogue_ID") from None
        try:
            utt = parse_int(rec["Utterance_ID"])
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
                extras[name] = parse_int(rec[col]) if rec.get(col, "") != "" else None
            except ValueError:
                raise bad(f"{col} is not an integer", col) from None
        label = check_label(rec["Emotion"], emotions, path, line, "line", "Emotion")
        sentiment = check_label(rec["Sentiment"], sentiments, path, line, "line", "Sentiment")
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
        columns, records, row_kind = *csv_records(path), "line"
    elif suffix in (".jsonl", ".ndjson"):
        columns, records, row_kind = *jsonl_records(path), "line"
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
    check_columns(list(columns), REQUIRED, path, row_kind)
    labels = {"label": _label_set(label_set), "sentiment": _label_set(sentiment_set)}
    keep = [c for c in columns if extra_arrays is None or c in SCHEMA.names]
    rows: dict[str, list] = {c: [] for c in keep}
    row_nums = []
    for row, rec in records:
        def bad(reason, column, row=row, rec=rec):
            return DataError(reason, path, row, row_kind=row_kind, column=column, value=rec.get(column))

        out = {}
        for col in keep:
            v = rec.get(col)
            if col == "turn":
                if v is None or v == "":
                    raise bad("missing value", col)
                try:
                    v = parse_int(v)
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
                v = check_label(v, labels[col], path, row, row_kind, col)
            elif col in ("valence", "arousal", "dominance"):
                try:
                    v = parse_float(v)
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
