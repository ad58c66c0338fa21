"""Feature scaling end to end on a real local Ray: fitted on train in the Ray Train worker, stored with the
model, applied identically by the training code path and by ``VanillaPredictor`` (which ``mer predict``
and Serve load); missing features stay missing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray]
LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def store(path, seed=0):
    """Three splits of 3-turn dialogues with eGeMAPS-scaled columns (stds 0.0075-175, means up to 2,700)
    whose labels shift the two smallest-scale columns; every 7th row has no audio."""
    rng = np.random.default_rng(seed)
    std, mean = np.logspace(np.log10(0.0075), np.log10(175), 88), np.linspace(0, 2700, 88)
    rows = []
    for split, n in (("train", 60), ("dev", 15), ("test", 15)):
        for d in range(n):
            for t in range(3):
                k = int(rng.integers(0, 4))
                x = rng.normal(mean, std)
                x[:2] += std[:2] * 2.0 * np.array([k % 2, k // 2])  # the signal sits in the tiniest columns
                i = len(rows)
                rows.append(dict(dialogue_id=f"{split}{d}", turn=t, speaker="AB"[t % 2], text="", split=split, label=LABELS[k],
                                 audio_egemaps=None if i % 7 == 3 else x.astype(np.float32).tolist()))
    t = pa.Table.from_pylist(rows, schema=pa.schema([("dialogue_id", pa.string()), ("turn", pa.int64()), ("speaker", pa.string()),
                                                     ("text", pa.string()), ("split", pa.string()), ("label", pa.string()),
                                                     ("audio_egemaps", pa.list_(pa.float32()))]))
    path.mkdir(parents=True)
    pq.write_table(t, path / "part-0.parquet")
    return path, t


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    from mer_ray.vanilla.model import VanillaConfig
    from mer_ray.vanilla.train import TrainConfig, fit

    base = tmp_path_factory.mktemp("scaling")
    path, table = store(base / "store")
    cfg = TrainConfig(model=VanillaConfig(encoder="frozen", modalities=["audio_egemaps"], hidden=16), emotion_labels="meld7",
                      sentiment_labels=None, epochs=2, batch_utterances=24)
    res = fit(cfg, path, base / "ray", "scaling", export_dir=base / "model")
    return cfg, table, res


def test_statistics_are_fitted_on_present_train_rows_only_and_stored(trained):
    from sklearn.preprocessing import RobustScaler

    from mer_ray.vanilla.artifacts import read_meta

    _, table, res = trained
    st = read_meta(res["export_dir"])["feature_scaling"]["audio_egemaps"]
    train = [v for v, s in zip(table["audio_egemaps"].to_pylist(), table["split"].to_pylist()) if s == "train" and v is not None]
    assert st["n"] == len(train) < 180  # the missing rows were not fitted (as zeros or anything else)
    rs = RobustScaler(unit_variance=True).fit(np.asarray(train, np.float32).astype(np.float64))
    np.testing.assert_array_equal(np.float32(st["center"]), rs.center_.astype(np.float32))
    assert st["clip"] == 5.0


def test_training_path_and_predictor_give_identical_outputs(trained):
    import pyarrow.compute as pc
    import torch

    from mer_ray.vanilla.artifacts import read_meta, read_weights
    from mer_ray.vanilla.batches import dialogues_from_table
    from mer_ray.vanilla.model import VanillaConfig, build_vanilla
    from mer_ray.vanilla.predict import VanillaPredictor
    from mer_ray.vanilla.steps import predict_dialogues
    from mer_ray.vanilla.train import fit_feature_scaling

    _, table, res = trained
    meta = read_meta(res["export_dir"])
    mcfg = VanillaConfig.model_validate(meta["model"])
    # What the Ray Train worker does: build, fit the statistics on the train dialogues, train (here: load
    # the trained parameters, not the stored statistics), predict through collate + forward.
    split = lambda s: table.filter(pc.equal(table["split"], s))  # noqa: E731
    model = build_vanilla(mcfg)
    model.set_scaling(fit_feature_scaling(dialogues_from_table(split("train"), mcfg, LABELS), mcfg))
    params = {k: v for k, v in read_weights(res["export_dir"]).items() if not k.startswith("scalers.")}
    missing, _ = model.load_state_dict(params, strict=False)
    assert missing and all(k.startswith("scalers.") for k in missing)
    test = split("test")
    training = np.concatenate([p["emotion_probs"] for p in predict_dialogues(model, dialogues_from_table(test, mcfg), mcfg)])
    predictor = VanillaPredictor.from_dir(res["export_dir"])
    np.testing.assert_array_equal(predictor.predict_table(test)["emotion_probs"], training)  # same batches, same floats
    # one row as Serve passes it (predict_dialogue), alone in its batch in both paths
    rows = [r for r in test.to_pylist() if r["dialogue_id"] == "test0"]
    one = predict_dialogues(model, dialogues_from_table(pa.Table.from_pylist(rows, schema=test.schema), mcfg), mcfg)[0]
    np.testing.assert_array_equal(predictor.predict_dialogue(rows)["emotion_probs"], one["emotion_probs"])
    # the stored statistics are what the worker fitted
    for k in ("center", "scale"):
        assert torch.equal(predictor.model.scalers["audio_egemaps"].__getattr__(k), model.scalers["audio_egemaps"].__getattr__(k))
    assert json.loads(json.dumps(meta["feature_scaling"])) == meta["feature_scaling"]

