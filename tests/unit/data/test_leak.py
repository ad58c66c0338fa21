"""Gold labels never reach a model's inputs: stripping, the guard, and canaries that would catch a leak."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from mer_ray.data.leak import (
    GoldLeakError,
    assert_no_canaries,
    assert_no_gold,
    canary_gold,
    gold_columns,
    is_gold_column,
    strip_gold,
)
from mer_ray.data.schema import GOLD_COLUMNS


def _table():
    return pa.table({
        "dialogue_id": ["d", "d"], "turn": pa.array([0, 1], pa.int64()), "speaker": ["A", "B"],
        "text": ["I won!", "Oh no."], "label": ["joy", "sadness"], "sentiment": ["positive", "negative"],
        "valence": [0.9, 0.1], "arousal": [0.8, 0.3], "dominance": [0.7, 0.2],
        "Emotion": ["joy", "sadness"], "gold_sentiment": ["positive", "negative"],  # gold under other names
        "emotion_probs": [[0.9, 0.1], [0.2, 0.8]], "sentiment_probs": [[0.5, 0.5], [0.1, 0.9]],  # predictions
    })


def test_strip_gold_drops_gold_keeps_predictions():
    stripped = strip_gold(_table())
    assert stripped.column_names == ["dialogue_id", "turn", "speaker", "text", "emotion_probs", "sentiment_probs"]
    assert not gold_columns(stripped)
    assert all(is_gold_column(c) for c in GOLD_COLUMNS) and not is_gold_column("emotion_pred")


def test_assert_no_gold_names_columns_and_place():
    with pytest.raises(GoldLeakError, match=r"\['label', 'sentiment', .*'Emotion', 'gold_sentiment'\] reached "
                                            r"the LLM prompt builder"):
        assert_no_gold(_table(), "the LLM prompt builder")
    table = strip_gold(_table())
    for form in (table, table.schema, table.to_pydict(), table.column_names, table.to_batches()[0]):
        assert_no_gold(form, "vanilla model inputs")  # passes on every form
    batch = _table().to_pydict()
    with pytest.raises(GoldLeakError, match="'valence'"):
        assert_no_gold(batch, "a Ray Data batch")
    assert set(strip_gold(batch)) == set(table.column_names)  # a batch dict strips the same way


def _model_inputs(table: pa.Table) -> list[str]:
    """The widest input a model could be given: every remaining column of each row, serialised."""
    return [json.dumps(row, default=str) for row in table.to_pylist()]


def test_canaries_catch_a_leak_and_pass_once_stripped(tmp_path):
    from mer_ray.data.loaders import load_manifest

    path = tmp_path / "m.jsonl"
    rows = [{"dialogue_id": "d", "turn": i, "speaker": "AB"[i % 2], "text": f"line {i}", "label": "joy",
             "sentiment": "positive", "valence": 0.5, "note": "x"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table, canaries = canary_gold(load_manifest(path))
    assert len(canaries) == 12 * 5  # label, sentiment, valence, arousal, dominance (null ones too)
    # Control: feeding the unstripped table leaks, and the check says so.
    with pytest.raises(GoldLeakError, match="60 gold value") as e:
        assert_no_canaries(_model_inputs(table), canaries, "model inputs")
    assert set(e.value.found) == canaries
    leaky = table.append_column("hint", table["label"])  # a copy of gold under an innocent name
    with pytest.raises(GoldLeakError, match="12 gold value") as e:
        assert_no_canaries(_model_inputs(strip_gold(leaky)), canaries, "model inputs")
    assert e.value.found == sorted(f"CANARY_label_{i}_" for i in range(12))
    # Stripped: no gold column and no gold value survives anywhere in the inputs.
    stripped = strip_gold(table)
    assert_no_gold(stripped, "model inputs")
    assert_no_canaries(_model_inputs(stripped), canaries, "model inputs")
    assert_no_canaries(stripped, canaries, "model inputs")


def test_float_canaries_are_found_exactly():
    table, canaries = canary_gold(pa.table({"valence": [0.1, 0.2], "text": ["a", "b"]}))
    value = table["valence"][1].as_py()
    assert str(value) in canaries
    with pytest.raises(GoldLeakError):
        assert_no_canaries({"features": [0.0, value]}, canaries, "features")
    assert_no_canaries({"features": [0.0, 0.1]}, canaries, "features")


def test_meld_dev_and_test_gold_do_not_survive_strip(meld_dir):
    """On real MELD, gold Emotion *and* Sentiment are gone from what is left for model inputs."""
    from mer_ray.data.loaders import load_meld

    for split in ("dev", "test"):
        table = load_meld(meld_dir, split)
        canaried, canaries = canary_gold(table)
        stripped = strip_gold(canaried)
        assert not {"label", "sentiment"} & set(stripped.column_names)
        assert_no_canaries(_model_inputs(stripped), canaries, f"MELD {split} model inputs")
        # No remaining column re-encodes the gold: none matches the label or sentiment row for row.
        gold = {c: table[c].to_pylist() for c in ("label", "sentiment")}
        for name in stripped.column_names:
            values = [str(v).lower() for v in stripped[name].to_pylist()]
            for col, g in gold.items():
                same = sum(a == b for a, b in zip(values, g))
                assert same < 0.01 * len(g), (split, name, col, same)
