"""VanillaPredictor without Ray: the predictions contract, and that gold labels never reach the inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from mer_ray.data.leak import assert_no_canaries, canary_gold
from mer_ray.data.schema import GOLD_COLUMNS
from mer_ray.demo.corpus import make_rows
from mer_ray.vanilla.model import VanillaConfig, build_vanilla
from mer_ray.vanilla.predict import VanillaPredictor

EMO = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def _table(n_dialogues=8) -> pa.Table:
    rows = make_rows(n_dialogues, seed=3)
    rng = np.random.default_rng(0)
    for r in rows:  # stand-in features: the leak test needs any inputs, not good ones
        r["text_embedding"] = rng.normal(size=384).astype(np.float32).tolist()
        r["audio_egemaps"] = None if rng.random() < 0.3 else rng.normal(size=88).tolist()
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = VanillaConfig(modalities=["text_embedding", "audio_egemaps"], hidden=16)
    torch.manual_seed(0)
    model = build_vanilla(cfg)
    d = tmp_path_factory.mktemp("vanilla")
    torch.save(model.state_dict(), d / "model.pt")
    meta = {"model": cfg.model_dump(), "emotion_labels": EMO, "sentiment_labels": ["neutral", "positive", "negative"],
            "has_vad": True, "vad_mean": [3.0, 3.0, 3.0], "vad_std": [1.0, 1.0, 1.0], "seed": 0}
    (d / "vanilla.json").write_text(json.dumps(meta))
    return d


def test_predictions_contract(model_dir):
    pred = VanillaPredictor.from_dir(model_dir)
    table = _table()
    out = pred.predictions_table(table)
    assert out.num_rows == table.num_rows
    assert not set(GOLD_COLUMNS) & set(out.column_names)
    assert out.column_names[:5] == ["dialogue_id", "turn", "speaker", "text", "split"]
    assert json.loads(out.schema.metadata[b"emotion_labels"]) == EMO
    probs = np.array(out.column("emotion_probs").to_pylist())
    assert probs.shape == (table.num_rows, 7)
    # float32 softmax over 7 classes (each p within a few ulp), summed in float64: |sum - 1| < 1e-6
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert out.column("emotion_pred").to_pylist() == [EMO[i] for i in probs.argmax(1)]
    assert len(out.column("sentiment_probs")[0].as_py()) == 3 and len(out.column("vad")[0].as_py()) == 3
    assert pred.label_set.labels == tuple(EMO)


def test_gold_labels_never_change_predictions(model_dir):
    """Permuting, blanking or canary-replacing every gold column leaves predictions bit-identical."""
    pred = VanillaPredictor.from_dir(model_dir)
    table = _table()
    ref = pred.predictions_table(table)
    rng = np.random.default_rng(1)
    permuted = table
    for c in GOLD_COLUMNS:
        i = permuted.schema.get_field_index(c)
        permuted = permuted.set_column(i, c, permuted.column(c).take(pa.array(rng.permutation(table.num_rows))))
    blank = table
    for c in GOLD_COLUMNS:
        blank = blank.set_column(blank.schema.get_field_index(c), c, pa.nulls(table.num_rows, table.schema.field(c).type))
    canaried, canaries = canary_gold(table)
    for variant in (permuted, blank, canaried, table.drop_columns(list(GOLD_COLUMNS))):
        assert pred.predictions_table(variant).equals(ref)
    assert_no_canaries(pred.predictions_table(canaried), canaries, "vanilla predictions")


def test_predict_dialogue_matches_table_and_any_order(model_dir):
    pred = VanillaPredictor.from_dir(model_dir)
    table = _table(1)
    rows = table.to_pylist()
    whole = pred.predict_dialogue(rows)
    ref = pred.predictions_table(table)
    # one dialogue, the same features sorted by turn, the same model call: identical float32 values
    np.testing.assert_array_equal(whole["emotion_probs"], np.array(ref.column("emotion_probs").to_pylist()))
    shuffled = pred.predict_dialogue(rows[::-1])  # order given = order returned; turns carry the order
    np.testing.assert_array_equal(shuffled["emotion_probs"][::-1], whole["emotion_probs"])
    with pytest.raises(ValueError, match="lacks 'text'"):
        pred.predict_dialogue([{"speaker": "A"}])


def test_from_dir_names_a_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="vanilla.json"):
        VanillaPredictor.from_dir(tmp_path)
