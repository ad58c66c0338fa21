"""Loaders on the real MELD files and on manifests the tests write; every bad-input case."""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer_ray.data.loaders import DataError, load_manifest, load_meld, parse_time, summarize
from mer_ray.data.schema import SCHEMA

MELD_COUNTS = {"train": (9989, 1038, 72), "dev": (1109, 114, 2), "test": (2610, 280, 2)}


@pytest.fixture(scope="module")
def meld(meld_dir):
    return {s: load_meld(meld_dir, s) for s in MELD_COUNTS}


def _csv_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- real MELD
@pytest.mark.parametrize("split", list(MELD_COUNTS))
def test_meld_counts_and_contract(meld, split):
    table = meld[split]
    n, dialogues, gapped = MELD_COUNTS[split]
    s = summarize(table)
    assert (s["utterances"], s["dialogues"], s["dialogues_with_turn_gaps"]) == (n, dialogues, gapped)
    assert s["empty_texts"] == 0 and sum(s["labels"].values()) == n
    assert table.schema.names[: len(SCHEMA)] == SCHEMA.names
    for f in SCHEMA:
        assert table.schema.field(f.name).type == f.type
    keys = list(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist()))
    assert keys == sorted(keys) and len(set(keys)) == n
    assert all(d.startswith(f"{split}/") for d in table["dialogue_id"].to_pylist())
    assert set(table["split"].to_pylist()) == {split}
    assert table["start"].null_count == n and table["end"].null_count == n  # no per-clip offsets in MELD
    assert table["episode_start"].null_count == 0
    assert all(a <= b for a, b in zip(table["episode_start"].to_pylist(), table["episode_end"].to_pylist()))


def test_meld_matches_csv_row_for_row(meld, meld_dir):
    """Every CSV row is in the table with its own values: gaps kept, times parsed, nothing dropped."""
    rows = _csv_rows(meld_dir / "train_sent_emo.csv")
    by_key = {(d, t): i for i, (d, t) in enumerate(zip(meld["train"]["dialogue_id"].to_pylist(),
                                                        meld["train"]["turn"].to_pylist()))}
    cols = {c: meld["train"][c].to_pylist() for c in ("text", "speaker", "label", "sentiment", "video",
                                                       "episode_start", "episode_end")}
    turns = defaultdict(list)
    for r in rows:
        i = by_key[(f"train/{r['Dialogue_ID']}", int(r["Utterance_ID"]))]
        assert cols["text"][i] == r["Utterance"] and cols["speaker"][i] == r["Speaker"]
        assert (cols["label"][i], cols["sentiment"][i]) == (r["Emotion"], r["Sentiment"])
        assert cols["video"][i] == f"dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}.mp4"
        assert cols["episode_start"][i] == parse_time(r["StartTime"])  # the loader's own parse, stored as float64
        turns[r["Dialogue_ID"]].append(int(r["Utterance_ID"]))
    gapped = [d for d, t in turns.items() if sorted(t) != list(range(len(t)))]
    assert len(gapped) == 72
    d = gapped[0]
    table_turns = [t for (dd, t) in by_key if dd == f"train/{d}"]
    assert table_turns == sorted(turns[d]) and table_turns != list(range(len(table_turns)))


def test_parse_time_forms():
    # h*3600 + m*60 + s + float("0.mmm") in float64: one rounded addition away from the literal (rel ~1e-16)
    assert parse_time("0:10:44,769") == pytest.approx(644.769)
    assert parse_time("00:10:44,769") == pytest.approx(644.769)
    assert parse_time("00:05:11,82") == pytest.approx(311.82)
    assert parse_time("1:00:00.5") == pytest.approx(3600.5)
    assert parse_time(2.25) == 2.25 and parse_time("3") == 3.0 and parse_time("") is None
    for bad in ("0:61:00,000", "abc", "-1", "nan", "inf", True):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_meld_logs_summary(meld_dir, caplog):
    with caplog.at_level(logging.INFO, logger="mer_ray.data.loaders"):
        load_meld(meld_dir, "dev")
    assert any('"utterances": 1109' in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- bad MELD files
def _mini_meld(meld_dir, tmp_path, edit=None):
    """A dev CSV with the first 6 records, edited by ``edit(header, rows)``; returns its path."""
    with open(meld_dir / "dev_sent_emo.csv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), [next(reader) for _ in range(6)]
    if edit:
        header, rows = edit(header, rows) or (header, rows)
    path = tmp_path / "dev_sent_emo.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])
    return path


def _set(col, record, value):
    def edit(header, rows):
        rows[record][header.index(col)] = value
    return edit


@pytest.mark.parametrize(("col", "value", "reason"), [
    ("Emotion", "joyful", "unknown label"),
    ("Sentiment", "mixed", "unknown label"),
    ("Utterance_ID", "2a", "non-integer turn"),
    ("StartTime", "00:99:01,000", "bad time"),
    ("EndTime", "00:00:00,000", "bad time"),  # ends before it starts
])
def test_meld_bad_value_names_file_line_value(meld_dir, tmp_path, col, value, reason):
    path = _mini_meld(meld_dir, tmp_path, _set(col, 3, value))  # record 4 is on line 5
    with pytest.raises(DataError) as e:
        load_meld(tmp_path, "dev")
    msg = str(e.value)
    assert str(path) in msg and "line 5" in msg and repr(value) in msg and reason in msg
    assert (e.value.row, e.value.column, e.value.value) == (5, col, value)


def test_meld_duplicate_missing_column_and_encoding(meld_dir, tmp_path):
    def dup(header, rows):
        rows[4] = list(rows[3])
        rows[4][0] = "999"
    path = _mini_meld(meld_dir, tmp_path, dup)
    with pytest.raises(DataError, match=r"line 6: duplicate \(dialogue_id, turn\), first at line 5: \('dev/1', 1\)"):
        load_meld(tmp_path, "dev")

    def drop(header, rows):
        i = header.index("Emotion")
        return header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    path = _mini_meld(meld_dir, tmp_path, drop)
    with pytest.raises(DataError, match=r"line 1: missing column: 'Emotion'") as e:
        load_meld(tmp_path, "dev")
    assert str(path) in str(e.value)

    path = _mini_meld(meld_dir, tmp_path)
    data = path.read_bytes().split(b"\n")
    data[3] = data[3].replace(b"Or!", b"Or\xe9!")  # latin-1 e-acute: not UTF-8
    path.write_bytes(b"\n".join(data))
    with pytest.raises(DataError, match=r"line 4: bad encoding: not UTF-8 at byte offset \d+: b'\\xe9!") as e:
        load_meld(tmp_path, "dev")
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- manifests
ROWS = [
    {"dialogue_id": "b", "turn": 3, "speaker": "Ann", "text": "Great, thanks!", "label": "joy", "video": "b/3.mp4",
     "start": 1.5, "end": 2.75, "valence": 0.8, "note": "x"},
    {"dialogue_id": "b", "turn": 1, "speaker": "Bob", "text": "", "label": "neutral", "video": "b/1.mp4",
     "start": 0.0, "end": 1.5, "valence": None, "note": "y"},
    {"dialogue_id": "a", "turn": 0, "speaker": "Ann", "text": "Hi.", "label": None, "video": None,
     "start": None, "end": None, "valence": -0.25, "note": "z"},
]


def _write(rows, path):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats(tmp_path, fmt):
    table = load_manifest(_write(ROWS, tmp_path / f"m.{fmt}"), label_set="meld7")
    assert table.schema.names == [*SCHEMA.names, "note"]  # schema first, extra column kept
    for f in SCHEMA:
        assert table.schema.field(f.name).type == f.type
    got = table.select(["dialogue_id", "turn", "speaker", "text", "label", "video", "start", "end", "valence",
                        "note"]).to_pylist()
    assert got == sorted(ROWS, key=lambda r: (r["dialogue_id"], r["turn"]))
    s = summarize(table)
    assert (s["utterances"], s["dialogues"], s["empty_texts"]) == (3, 2, 1)
    assert s["labels"] == {"joy": 1, "neutral": 1, "null": 1}


def test_manifest_validates_labels_only_when_asked(tmp_path):
    rows = [dict(ROWS[0], label="elated")]
    assert load_manifest(_write(rows, tmp_path / "m.jsonl"))["label"].to_pylist() == ["elated"]
    with pytest.raises(DataError, match=r"line 1: unknown label in column 'label': 'elated'"):
        load_manifest(tmp_path / "m.jsonl", label_set="meld7")
    with pytest.raises(DataError, match="unknown label in column 'sentiment': 'happy'"):
        load_manifest(_write([dict(ROWS[0], sentiment="happy")], tmp_path / "s.csv"), sentiment_set="meld_sentiment3")


BAD = [  # (record index to corrupt, column, value, reason)
    (1, "label", "joyous", "unknown label"),
    (2, "turn", "two", "non-integer turn"),
    (2, "turn", 2.5, "non-integer turn"),
    (0, "start", "soon", "bad time"),
    (0, "end", 1.0, "bad time"),  # before start 1.5
    (1, "valence", "high", "not a number"),
]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize(("i", "col", "value", "reason"), BAD)
def test_manifest_bad_value_names_file_row_value(tmp_path, fmt, i, col, value, reason):
    rows = [dict(r) for r in ROWS]
    rows[i][col] = value
    if fmt == "parquet" and isinstance(value, str):  # one Parquet column holds one type: make it strings
        for r in rows:
            r[col] = None if r[col] is None else str(r[col])
    path = _write(rows, tmp_path / f"m.{fmt}")
    with pytest.raises(DataError) as e:
        load_manifest(path, label_set="meld7")
    row = f"record {i + 1}" if fmt == "parquet" else f"line {i + 2 if fmt == 'csv' else i + 1}"
    shown = str(value) if fmt == "csv" else value  # CSV cells are strings
    msg = str(e.value)
    assert str(path) in msg and row in msg and reason in msg and f"'{col}': {shown!r}" in msg, msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_duplicate_and_missing_column(tmp_path, fmt):
    rows = [dict(r) for r in ROWS] + [dict(ROWS[1], text="again")]
    path = _write(rows, tmp_path / f"m.{fmt}")
    first, dup = {"csv": (3, 5), "jsonl": (2, 4), "parquet": (2, 4)}[fmt]
    kind = "record" if fmt == "parquet" else "line"
    with pytest.raises(DataError) as e:
        load_manifest(path)
    assert f"{path}, {kind} {dup}: duplicate (dialogue_id, turn), first at {kind} {first}: ('b', 1)" in str(e.value)

    path = _write([{k: v for k, v in r.items() if k != "speaker"} for r in ROWS], tmp_path / f"n.{fmt}")
    with pytest.raises(DataError, match="missing column: 'speaker'") as e:
        load_manifest(path)
    assert str(path) in str(e.value)


def test_manifest_bad_encoding_and_multiline_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    data = (b'{"dialogue_id": "a", "turn": 0, "speaker": "A", "text": "ok"}\n'
            b'{"dialogue_id": "a", "turn": 1, "speaker": "A", "text": "caf\xe9"}\n')
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError, match=rf"m.jsonl, line 2: bad encoding: not UTF-8 at byte offset {offset}\b"):
        load_manifest(path)
    # A quoted text spanning two lines: the next record's error names its own first line.
    path = tmp_path / "m.csv"
    path.write_text('dialogue_id,turn,speaker,text,label\na,0,A,"two\nlines",joy\na,1,B,next,glee\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m.csv, line 4: unknown label in column 'label': 'glee'"):
        load_manifest(path, label_set="meld7")
    assert load_manifest(path)["text"].to_pylist() == ["two\nlines", "next"]
    path.write_text('dialogue_id,turn,speaker,text,label\na,0,A,"two\nlines",glee\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m.csv, line 2: unknown label"):  # a record's first line
        load_manifest(path, label_set="meld7")


def test_manifest_rejects_unknown_format_and_missing_values(tmp_path):
    with pytest.raises(DataError, match="unknown manifest format"):
        load_manifest(_write(ROWS, tmp_path / "m.txt"))
    with pytest.raises(DataError, match=r"line 1: missing value in column 'dialogue_id'"):
        load_manifest(_write([dict(ROWS[0], dialogue_id=None)], tmp_path / "m.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "absent.csv")


def test_cli_data_summary(tmp_path, meld_dir):
    from typer.testing import CliRunner

    from mer_ray.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["data", "summary", "--manifest", str(_write(ROWS, tmp_path / "m.csv"))])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["empty_texts"] == 1
    res = runner.invoke(app, ["data", "summary", "--dataset", "meld", "--data-dir", str(meld_dir), "--split", "dev"])
    assert res.exit_code == 0 and json.loads(res.stdout)["splits"]["dev"]["utterances"] == 1109
    bad = _write([dict(ROWS[0], label="glee")], tmp_path / "b.csv")
    res = runner.invoke(app, ["data", "summary", "--manifest", str(bad), "--label-set", "meld7"])
    assert res.exit_code == 2 and "'glee'" in res.output
