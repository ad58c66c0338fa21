"""`mer calibrate` end to end on a tiny models dir: the serve tests' tiny vanilla model predicts dev and test
rows (demo layout: ``../predictions/predictions_<split>.parquet``), gold comes from a manifest."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.calibration.artifacts import Calibration
from tests.integration.serve.test_local_mode import MELD7, tiny_models


def _features(split: str, n_dialogues: int, rng: np.random.Generator) -> pa.Table:
    rows = [(f"{split}/{d}", t) for d in range(n_dialogues) for t in range(5)]
    n = len(rows)

    def vecs(dim, center, scale):
        return pa.array(list((center + scale * rng.normal(size=(n, dim))).astype(np.float32)), pa.list_(pa.float32()))

    return pa.table({"dialogue_id": [r[0] for r in rows], "turn": [r[1] for r in rows], "speaker": ["A", "B"] * (n // 2) + ["A"] * (n % 2),
                     "text": ["hi"] * n, "split": [split] * n, "text_embedding": vecs(384, 0.0, 0.05),
                     "audio_egemaps": vecs(88, np.linspace(0, 2700, 88), np.logspace(-2, 2.2, 88)),
                     "face_embedding": vecs(128, 0.2, 0.5)})


def test_mer_calibrate_on_a_tiny_models_dir(tmp_path):
    from typer.testing import CliRunner

    from mer_ray.cli import app
    from mer_ray.vanilla.predict import VanillaPredictor

    root = tmp_path / "run"
    models = tiny_models(root / "models")
    pred = VanillaPredictor.from_dir(models / "vanilla", num_threads=1)
    rng = np.random.default_rng(0)
    gold = []
    for split in ("dev", "test"):
        t = pred.predictions_table(_features(split, 60, rng))
        path = root / "predictions" / f"predictions_{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path)
        # gold drawn from the model's distribution sharpened by 1/0.5: calibration should find T near 0.5
        p = np.asarray(t["emotion_probs"].to_pylist(), dtype=np.float64) ** 2
        p /= p.sum(1, keepdims=True)
        y = [int(rng.choice(7, p=q)) for q in p]
        gold += [{"dialogue_id": d, "turn": k, "speaker": "A", "text": "hi", "label": MELD7[j], "split": split}
                 for d, k, j in zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist(), y)]
    manifest = tmp_path / "gold.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in gold))
    out, png = tmp_path / "bench" / "calibration.json", tmp_path / "bench" / "reliability.png"
    res = CliRunner().invoke(app, ["calibrate", "--models", str(models), "--manifest", str(manifest),
                                   "--out", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    cal = Calibration.load(models)
    assert cal is not None and cal.label_set == "meld7" and cal.method == "class_conditional_lac"
    assert set(cal.temperatures) == {"final_no_llm", "vanilla"}
    assert 0.3 < cal.temperatures["vanilla"] < 0.8
    assert set(cal.conformal["final_no_llm"]) == {"meld7", "meld_sentiment3", "emorynlp7", "iemocap4"}
    assert cal.fitted_on["kind"] == "models_dir" and cal.fitted_on["n"] == 300
    sets = cal.prediction_sets("final_no_llm", "meld7", cal.calibrate("final_no_llm", np.full((2, 7), 1 / 7)))
    assert len(sets) == 2 and all(sets)
    rep = json.loads(out.read_text())
    assert set(rep["test"]) == {"final_no_llm", "vanilla"} and rep["test"]["vanilla"]["n"] == 300
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(rep["test"]["vanilla"])
    c = rep["conformal"]
    assert c["distribution"] == "final_no_llm" and {"alpha", "method", "coverage", "coverage_per_class",
                                                     "mean_set_size", "topk_baseline"} <= set(c)
    assert png.read_bytes()[:4] == b"\x89PNG"
