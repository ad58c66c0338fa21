"""``mer calibrate-adapter``: one adapter's temperature and conformal scores, fitted on its own dev predictions
(made by ``mer predict llm``) and read back by the adapter when it loads; bad inputs are refused by name."""

from __future__ import annotations

import csv
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

IEMOCAP4 = ["happy", "sad", "neutral", "angry"]
LINES = ["I got the job!", "She left and never called.", "The bus comes at nine.", "Stop touching my things!"]


def _cli(*args):
    from mer_ray.cli import app

    r = CliRunner().invoke(app, list(map(str, args)))
    return r, " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A models dir with the tiny ``calls`` adapter (iemocap4), a 120-utterance dev manifest and its predictions."""
    from mer_ray.mllm.adapters import install_adapter
    from mer_ray.mllm.tiny import build_tiny_finetuned, build_tiny_lm

    root = tmp_path_factory.mktemp("adapter_cal")
    models = root / "models"
    install_adapter(build_tiny_finetuned(build_tiny_lm(root / "base", "gemma3"), root / "ft", "iemocap4", 2), models, "calls")
    manifest = root / "dev.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dialogue_id", "turn", "speaker", "text", "label"])
        for d in range(40):
            for t in range(3):
                k = (d + t) % 4  # balanced: 30 utterances per label, above the class-conditional minimum (19)
                w.writerow([f"d{d:02d}", t, "AB"[t % 2], f"{LINES[k]} ({d})", IEMOCAP4[k]])
    preds = root / "dev_preds.parquet"
    r, out = _cli("predict", "llm", "--model", models / "mllm/adapters/calls", "--manifest", manifest, "--split", "dev",
                  "--out", preds)
    assert r.exit_code == 0, out
    return models, manifest, preds


def test_an_adapter_is_calibrated_on_its_dev_predictions_and_loads_with_it(setup):
    from mer_ray.calibration.artifacts import Calibration
    from mer_ray.mllm.adapters import AdapterHost, adapters_root

    models, manifest, preds = setup
    r, out = _cli("calibrate-adapter", "--models", models, "--name", "calls", "--predictions", preds, "--manifest", manifest,
                  "--alpha", "0.2")
    assert r.exit_code == 0, out
    cal = Calibration.load(adapters_root(models) / "calls")
    assert (cal.label_set, cal.labels, cal.alpha_default) == ("iemocap4", IEMOCAP4, 0.2)
    assert cal.fitted_on["kind"] == "adapter" and cal.fitted_on["n"] == 120 and cal.fitted_on["n_dialogues"] == 40
    assert set(cal.temperatures) == {"mllm"} and "iemocap4" in cal.conformal["mllm"]
    assert f"T = {cal.temperatures['mllm']:.4f}" in out
    # the fit minimises the dev NLL over log T (xatol 1e-5, so within ~1e-10 of the minimum near T): never above T = 1's
    from mer_ray.calibration.reliability import nll
    from mer_ray.calibration.temperature import apply_temperature

    t = pq.read_table(preds)
    p = np.asarray(t["emotion_probs"].to_pylist(), dtype=np.float64)
    y = np.array([(int(d[1:]) + k) % 4 for d, k in zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist())])
    assert nll(apply_temperature(p, cal.temperatures["mllm"]), y) <= nll(p, y) + 1e-9
    adapter = AdapterHost(models).load("calls")
    assert adapter.temperature == cal.temperatures["mllm"]
    rule = adapter.set_rule("iemocap4", 0.3)
    assert rule["labels"] == IEMOCAP4 and rule["alpha"] == 0.3 and rule["thresholds"] == cal.thresholds("mllm", "iemocap4", 0.3).tolist()
    assert adapter.set_rule("iemocap4")["alpha"] == 0.2  # the request gave none: the calibration's default
    with pytest.raises(ValueError, match=r"outside the range this calibration supports"):
        adapter.set_rule("iemocap4", 0.001)


def test_bad_inputs_are_refused_by_name(setup, tmp_path):
    from mer_ray.calibration.adapter import calibrate_adapter
    from mer_ray.calibration.sources import gold_from_table
    from mer_ray.data.loaders import load_manifest

    models, manifest, preds = setup
    gold = gold_from_table(load_manifest(manifest), "dev")["dev"]
    with pytest.raises(ValueError, match=r"unknown adapter 'tv' .* known adapters: \['calls'\]"):
        calibrate_adapter(models, "tv", preds, gold)
    t = pq.read_table(preds)
    pq.write_table(t.set_column(t.schema.get_field_index("split"), "split", [["test"] * t.num_rows]), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"fits on dev only, these rows are split \['test'\]"):
        calibrate_adapter(models, "calls", tmp_path / "test.parquet", gold)
    pq.write_table(t.replace_schema_metadata({"emotion_labels": '["a", "b", "c", "d"]'}), tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match=r"labels \['a', 'b', 'c', 'd'\] are not adapter 'calls'"):
        calibrate_adapter(models, "calls", tmp_path / "labels.parquet", gold)
    with pytest.raises(ValueError, match=r"rows have no gold label"):
        calibrate_adapter(models, "calls", preds, {k: v for k, v in list(gold.items())[:10]})
