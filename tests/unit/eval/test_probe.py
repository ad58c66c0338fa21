"""The linear-probe baseline: features, scaling, missing cells, C on dev, gold kept out, the comparison and
its flag in report.md, ``mer eval --store`` and the pipeline's probe step (no Ray: a store on disk)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer_ray.eval.metrics import compute_metrics
from mer_ray.eval.probe import column_matrix, compare, fit_probe, probe_block, probe_features, probe_metrics
from mer_ray.eval.report import to_markdown

LABELS = ["neutral", "joy", "anger"]  # a subset of meld7, so the pipeline's label set reads them
F32 = pa.list_(pa.float32())
#: audio-like scales, as eGeMAPS has (std 0.0075 to 175, means up to 2,700)
SCALES = np.array([1e-3, 1e-2, 1.0, 10.0, 1e3])
OFFSETS = np.array([0.0, 5.0, -3.0, 2700.0, 100.0])


def _split(n: int, split: str, seed: int, missing: float = 0.2) -> pa.Table:
    """Rows whose label depends on both columns; audio cells go missing at random, and face cells are
    missing for most ``anger`` rows (so missingness itself is informative)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    audio = rng.normal(size=(n, 5))
    audio[:, 0] += 2.5 * (y == 1)
    audio[:, 3] += 2.5 * (y == 2)
    audio = audio * SCALES + OFFSETS
    face = rng.normal(size=(n, 3))
    face[:, 1] += 2.0 * (y == 1)
    audio_cells = [list(a) if rng.random() > missing else None for a in audio]
    face_cells = [None if (y[i] == 2 and rng.random() < 0.8) or rng.random() < 0.1 else list(f) for i, f in enumerate(face)]
    return pa.table({"dialogue_id": [f"{split}{i:04d}" for i in range(n)], "turn": [0] * n, "speaker": ["A"] * n,
                     "text": [""] * n, "split": [split] * n, "label": [LABELS[i] for i in y],
                     "audio_egemaps": pa.array(audio_cells, F32), "face_probs": pa.array(face_cells, F32)})


@pytest.fixture(scope="module")
def data():
    return {"train": _split(400, "train", 0), "dev": _split(150, "dev", 1), "test": _split(150, "test", 2)}


@pytest.fixture(scope="module")
def fitted(data):
    return fit_probe(data["train"], ["audio_egemaps", "face_probs"], LABELS, dev_table=data["dev"])


def test_probe_features_are_the_models():
    store = ["dialogue_id", "text_embedding", "audio_egemaps", "face_embedding"]
    assert probe_features(["audio_egemaps"], "frozen", store) == ["audio_egemaps"]
    assert probe_features(["text_embedding", "face_embedding"], "frozen", store) == ["text_embedding", "face_embedding"]
    assert probe_features([], "minilm", store) == ["text_embedding"]  # the model reads tokens: their frozen embedding
    assert probe_features(["audio_egemaps"], "tiny", store) == ["text_embedding", "audio_egemaps"]
    with pytest.raises(ValueError, match="lacks.*text_embedding"):
        probe_features([], "minilm", ["audio_egemaps"])


def test_column_matrix_keeps_missing_cells_missing():
    t = pa.table({"x": pa.array([[1.0, 2.0], None, [], [3.0, 4.0]], F32)})
    m = column_matrix(t, "x")
    assert m.shape == (4, 2) and np.isnan(m[1]).all() and np.isnan(m[2]).all()
    np.testing.assert_array_equal(m[[0, 3]], [[1, 2], [3, 4]])
    assert column_matrix(pa.table({"x": pa.array([None, None], F32)}), "x", width=5).shape == (2, 5)
    with pytest.raises(ValueError, match="lengths"):
        column_matrix(pa.table({"x": pa.array([[1.0], [1.0, 2.0]], F32)}), "x")


def test_probe_is_accurate_on_badly_scaled_features_with_missing_cells(data, fitted):
    m = probe_metrics(fitted, {"test": data["test"]}, data["test"])["test"]
    assert m["n"] == 150 and m["accuracy"] > 85 and m["weighted_f1"] > 85
    assert fitted.columns == ["audio_egemaps", "face_probs"] and fitted.widths == [5, 3] and fitted.n_train == 400
    impute = fitted.pipeline.named_steps["impute"]
    for name in ("audio_egemaps", "face_probs"):  # missing cells get indicators, one per dimension
        assert impute.named_transformers_[name].indicator_ is not None
    assert impute.transform(np.full((1, 8), np.nan)).shape == (1, 16)
    # an imputed cell is the train median, not zero (0 is far from audio dim 3's values near 2,700)
    filled = impute.transform(np.full((1, 8), np.nan))[0, :5]
    np.testing.assert_allclose(filled, np.nanmedian(column_matrix(data["train"], "audio_egemaps"), axis=0))
    assert filled[3] > 2000
    # after scaling, every dimension is on one scale
    z = fitted.pipeline[:-1].transform(np.concatenate([column_matrix(data["test"], c) for c in fitted.columns], 1))
    assert np.abs(z.mean(0)).max() < 1.0 and z[:, :8].std(0).max() < 2.0


def test_missingness_alone_is_informative(data):
    """face cells are missing for most anger rows: the indicator lets the probe use that."""
    face_only = fit_probe(data["train"], ["face_probs"], LABELS)
    recall = compute_metrics(data["test"]["label"].to_pylist(), face_only.predict(data["test"]).tolist(), LABELS)
    assert recall["per_class_f1"]["anger"] > 60


def test_C_is_chosen_on_dev(data, fitted):
    assert set(fitted.dev_weighted_f1) == {"0.01", "0.1", "1.0", "10.0"}
    assert fitted.dev_weighted_f1[str(fitted.C)] == max(fitted.dev_weighted_f1.values())
    grid = (1e-6, 1.0)  # 1e-6: (almost) the class prior, one label for every row
    assert fit_probe(data["train"], ["audio_egemaps"], LABELS, dev_table=data["dev"], grid=grid).C == 1.0
    train = data["train"]
    majority = max(LABELS, key=train["label"].to_pylist().count)
    all_majority = data["dev"].set_column(data["dev"].schema.get_field_index("label"), "label", pa.array([majority] * 150))
    assert fit_probe(train, ["audio_egemaps"], LABELS, dev_table=all_majority, grid=grid).C == 1e-6  # dev decides
    no_dev = fit_probe(train, ["audio_egemaps"], LABELS)
    assert no_dev.C == 1.0 and no_dev.dev_weighted_f1 == {}


def test_gold_never_reaches_the_probe(data, fitted):
    test = data["test"]
    shuffled = test.set_column(test.schema.get_field_index("label"), "label", pa.array(np.random.default_rng(0).permutation(test["label"].to_pylist())))
    assert fitted.predict(test).tolist() == fitted.predict(shuffled).tolist() == fitted.predict(test.drop_columns(["label"])).tolist()
    with pytest.raises(ValueError, match="gold columns"):
        fit_probe(data["train"], ["audio_egemaps", "label"], LABELS)


def test_only_labelled_rows_train_and_two_classes_are_needed(data):
    t = data["train"]
    labels = ["" if i % 4 == 0 else v for i, v in enumerate(t["label"].to_pylist())]
    probe = fit_probe(t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels)), ["audio_egemaps"], LABELS)
    assert probe.n_train == sum(v != "" for v in labels)
    with pytest.raises(ValueError, match="1 class"):
        fit_probe(t.filter(pa.compute.equal(t["label"], "joy")), ["audio_egemaps"], LABELS)


def _m(wf1, acc, mf1, n=100):
    return {"weighted_f1": wf1, "accuracy": acc, "macro_f1": mf1, "n": n}


def test_compare_flags_a_model_that_loses_and_not_one_that_wins():
    worse = compare(_m(51.6, 54.6, 50.0), _m(90.0, 90.0, 89.0))
    assert worse["model_loses"] and worse["delta"]["accuracy"] == pytest.approx(-35.4)
    assert "loses to its linear probe" in worse["verdict"] and "-35.40 points" in worse["verdict"]
    better = compare(_m(70.0, 72.0, 60.0), _m(60.0, 65.0, 55.0))
    assert not better["model_loses"] and "beats" in better["verdict"] and better["delta"]["weighted_f1"] == pytest.approx(10.0)
    assert compare(_m(70.0, 60.0, 60.0), _m(65.0, 65.0, 55.0))["model_loses"]  # accuracy alone is enough
    with pytest.raises(ValueError, match="not comparable"):
        compare(_m(1, 1, 1, n=10), _m(1, 1, 1, n=11))


def _report(acc: float, n: int = 150) -> dict:
    keys = ("weighted_f1", "accuracy", "macro_f1", "uar", "war")
    r = {k: acc for k in keys} | {k + "_std": 0.0 for k in keys}
    r |= {"n": n, "per_seed": {"0": _m(acc, acc, acc)}, "per_class_f1": {"a": acc}, "per_class_f1_std": {"a": 0.0}}
    return {"title": "t", "seeds": [0], "test": r}


def test_report_md_shows_the_probe_and_flags_a_loss(data, fitted):
    metrics = probe_metrics(fitted, {"test": data["test"]}, data["test"])
    for acc, flagged in ((40.0, True), (99.0, False)):
        report = _report(acc)
        report["probe"] = probe_block(report, fitted, metrics)
        md = to_markdown(report, ["test"])
        assert "## Linear probe" in md and f"| test | linear probe | {metrics['test']['weighted_f1']:.2f} |" in md
        assert ("**Warning (test): The model loses to its linear probe on the same features" in md) is flagged
        assert md.index("## Linear probe") < md.index("## test: per seed")  # beside the headline, not at the bottom
    assert "Not computed: no store." in to_markdown(_report(50.0) | {"probe": {"skipped": "no store"}}, ["test"])
    assert "Linear probe" not in to_markdown(_report(50.0), ["test"])  # reports without a probe are as before


def _write_corpus(tmp_path, data):
    store = tmp_path / "features"
    store.mkdir()
    for s, t in data.items():
        pq.write_table(t, store / f"{s}.parquet")
    with open(tmp_path / "gold.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dialogue_id", "turn", "speaker", "text", "label", "split"])
        for t in data.values():
            for r in t.select(["dialogue_id", "turn", "speaker", "text", "label", "split"]).to_pylist():
                w.writerow(list(r.values()))
    test = data["test"]
    preds = pa.table({"dialogue_id": test["dialogue_id"], "turn": test["turn"],
                      "emotion_pred": pa.array(["neutral"] * test.num_rows)})  # a model that always says neutral
    pred_path = tmp_path / "pred.parquet"
    pq.write_table(preds.replace_schema_metadata({"emotion_labels": json.dumps(LABELS), "seed": "0"}), pred_path)
    return store, tmp_path / "gold.csv", pred_path


def test_mer_eval_with_a_store_reports_and_flags_the_probe(tmp_path, data):
    from typer.testing import CliRunner

    from mer_ray.vanilla.cli import app

    store, gold, pred = _write_corpus(tmp_path, data)
    args = ["eval", str(pred), "--data", str(gold), "--dataset", "manifest", "--split", "test"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r"), "--store", str(store)])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    probe = rep["probe"]
    assert probe["columns"] == ["audio_egemaps", "face_probs"] and probe["C"] in (0.01, 0.1, 1.0, 10.0)
    assert probe["test"]["model_loses"] and probe["test"]["probe"]["n"] == rep["test"]["n"] == 150
    assert probe["test"]["probe"]["accuracy"] > 85 and probe["test"]["model"]["accuracy"] == rep["test"]["accuracy"]
    assert "WARNING (test): The model loses to its linear probe" in res.output
    assert "**Warning (test)" in (tmp_path / "r" / "report.md").read_text()
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r1"), "--store", str(store), "--features", "face_probs"])
    assert one.exit_code == 0 and json.loads((tmp_path / "r1" / "report.json").read_text())["probe"]["columns"] == ["face_probs"]
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r2"), "--store", str(store), "--features", "text_embedding"])
    assert bad.exit_code != 0 and "text_embedding" in bad.output
    none = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r3")])
    assert none.exit_code == 0 and "linear probe: not computed (no --store given; pass --store" in none.output
    assert "skipped" in json.loads((tmp_path / "r3" / "report.json").read_text())["probe"]


def test_the_pipelines_probe_step_uses_the_models_columns_and_skips_cleanly(tmp_path, data):
    from mer_ray.data.loaders import load_manifest
    from mer_ray.vanilla.model import VanillaConfig
    from mer_ray.vanilla.recipe import PipelineConfig, probe_baseline
    from mer_ray.vanilla.train import TrainConfig

    store, gold_path, _ = _write_corpus(tmp_path, data)
    gold = load_manifest(gold_path)
    report = _report(40.0) | {"dev": _report(99.0, n=150)["test"]}
    cfg = PipelineConfig(dataset="manifest", predict_splits=["dev", "test"],
                         train=TrainConfig(model=VanillaConfig(encoder="frozen", modalities=["audio_egemaps"])))
    block = probe_baseline(store, gold, cfg, report)
    assert block["columns"] == ["audio_egemaps"] and block["n_train"] == 400
    assert block["test"]["model_loses"] and not block["dev"]["model_loses"]
    text = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": VanillaConfig(encoder="minilm", modalities=[])})})
    skipped = probe_baseline(store, gold, text, report)
    assert set(skipped) == {"skipped"} and "text_embedding" in skipped["skipped"]
