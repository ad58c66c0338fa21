"""The utterance schema: columns, types, nullability, gold columns; loaders follow it."""

from __future__ import annotations

import pyarrow as pa

from mer_ray.data.schema import GOLD_COLUMNS, OPTIONAL, REQUIRED, SCHEMA


def test_schema_columns_and_types():
    assert list(REQUIRED) == ["dialogue_id", "turn", "speaker", "text"]
    assert SCHEMA.names == [*REQUIRED, *OPTIONAL]
    assert SCHEMA.field("turn").type == pa.int64() and SCHEMA.field("dialogue_id").type == pa.string()
    for name in ("start", "end", "valence", "arousal", "dominance"):
        assert SCHEMA.field(name).type == pa.float64()
    for name in ("video", "audio", "label", "sentiment"):
        assert SCHEMA.field(name).type == pa.string()
    assert not any(SCHEMA.field(n).nullable for n in REQUIRED)
    assert all(SCHEMA.field(n).nullable for n in OPTIONAL)


def test_gold_columns_are_the_annotations():
    assert set(GOLD_COLUMNS) == {"label", "sentiment", "valence", "arousal", "dominance"}
    assert set(GOLD_COLUMNS) <= set(OPTIONAL) and not set(GOLD_COLUMNS) & set(REQUIRED)


def test_minimal_manifest_fills_every_schema_column(tmp_path):
    from mer_ray.data.loaders import load_manifest

    path = tmp_path / "m.csv"
    path.write_text("dialogue_id,turn,speaker,text\nd,0,A,hello\n", encoding="utf-8")
    table = load_manifest(path)
    assert table.schema.names == SCHEMA.names
    assert all(table.schema.field(f.name).type == f.type for f in SCHEMA)
    assert all(table[n].null_count == 1 for n in OPTIONAL)  # present and null, never missing
    assert table.cast(SCHEMA).to_pylist()[0]["text"] == "hello"  # conforms: required columns non-null
