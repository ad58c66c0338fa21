"""Integration on a real local Ray: extract -> Ray Train (per-epoch checkpoints) -> predict -> eval,
the report.json contract, reloading a checkpoint, and resuming a restarted run."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from mer_ray.data.schema import GOLD_COLUMNS

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    from mer_ray.demo.corpus import make_corpus
    from mer_ray.vanilla.model import VanillaConfig
    from mer_ray.vanilla.recipe import PipelineConfig, run_pipeline
    from mer_ray.vanilla.train import TrainConfig

    tmp = tmp_path_factory.mktemp("pipeline")
    manifest = make_corpus(tmp / "corpus", n_dialogues=30, seed=1)
    train = TrainConfig(model=VanillaConfig(encoder="frozen", hidden=16), epochs=1, batch_utterances=32, num_threads=1)
    cfg = PipelineConfig(dataset="manifest", seeds=[0, 1], parallel_seeds=2, train=train, extract={"media": False}, predict_threads=1)
    out = tmp / "run"
    report = run_pipeline(cfg, manifest, out)
    return {"cfg": cfg, "out": out, "report": report, "manifest": manifest}


def test_report_contract(run):
    rep = json.loads((run["out"] / "report.json").read_text())
    assert rep == json.loads(json.dumps(run["report"]))
    for split in ("dev", "test"):
        for k in ("weighted_f1", "accuracy", "macro_f1"):
            assert 0.0 <= rep[split][k] <= 100.0
            assert rep[split][k + "_std"] >= 0.0
        assert set(rep[split]["per_class_f1"]) == {"neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"}
        assert set(rep[split]["per_seed"]) == {"0", "1"}
        # the report's mean is np.mean of these very per-seed values (float64, JSON round trip is exact)
        assert rep[split]["weighted_f1"] == np.mean([v["weighted_f1"] for v in rep[split]["per_seed"].values()])
        assert (run["out"] / f"confusion_{split}.png").exists() and (run["out"] / f"per_class_f1_{split}.png").exists()
    assert rep["seeds"] == [0, 1]
    assert set(rep["step_seconds"]) == {"load", "extract", "train", "predict", "eval", "probe"}
    # the linear probe on the model's own columns, scored on the same rows as the seed mean
    assert rep["probe"]["columns"] == ["text_embedding"] and rep["probe"]["n_train"] > 0
    for split in ("dev", "test"):
        c = rep["probe"][split]
        assert c["probe"]["n"] == rep[split]["n"] and c["model"]["accuracy"] == rep[split]["accuracy"]
        assert c["delta"]["weighted_f1"] == pytest.approx(rep[split]["weighted_f1"] - c["probe"]["weighted_f1"])
        assert c["model_loses"] == (c["delta"]["accuracy"] < 0 or c["delta"]["weighted_f1"] < 0)
    assert "## Linear probe" in (run["out"] / "report.md").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", rep["config_sha256"]) and rep["config_sha256"] == run["cfg"].sha256()
    assert "weighted F1" in (run["out"] / "report.md").read_text()


def test_prediction_files_hold_every_row_and_no_gold(run):
    from mer_ray.data.loaders import load_manifest

    gold = load_manifest(run["manifest"])
    for seed in (0, 1):
        for split in ("dev", "test"):
            t = pq.read_table(run["out"] / "predictions" / f"seed{seed}" / f"predictions_{split}.parquet")
            assert not set(GOLD_COLUMNS) & set(t.column_names)
            assert t.num_rows == gold.column("split").to_pylist().count(split)


def test_checkpoint_per_epoch_reloads(run):
    from mer_ray.vanilla.predict import VanillaPredictor
    from mer_ray.vanilla.train import read_store_split

    info = json.loads((run["out"] / "models" / "vanilla" / "seed0" / "training.json").read_text())
    assert info["best_epoch"] == 0 and len(info["history"]) == 1
    table = read_store_split(run["out"] / "features", "dev")
    from_ckpt = VanillaPredictor.from_dir(info["checkpoint"]).predictions_table(table)
    exported = VanillaPredictor.from_dir(run["out"] / "models" / "vanilla" / "seed0").predictions_table(table)
    assert from_ckpt.equals(exported)


def test_restarted_run_resumes_from_last_checkpoint(run):
    from mer_ray.vanilla.train import fit

    cfg = run["cfg"].train.model_copy(update={"seed": 0, "epochs": 2})
    res = fit(cfg, run["out"] / "features", run["out"] / "ray_train", "vanilla_seed0", export_dir=run["out"] / "resumed")
    assert [h["epoch"] for h in res["history"]] == [0, 1]
    assert [h["resumed_run"] for h in res["history"]] == [False, True]  # epoch 0 came from the checkpoint
    assert len(list((run["out"] / "ray_train" / "vanilla_seed0").rglob("state.json"))) == 2
    assert res["best_epoch"] in (0, 1)
