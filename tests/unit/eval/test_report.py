"""Metrics against hand-worked values, and the evaluation report (JSON, Markdown, PNGs)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from mer_ray.eval.metrics import compute_metrics
from mer_ray.eval.report import build_report, evaluate_predictions

LABELS = ["a", "b", "c"]


def test_metrics_hand_worked():
    # gold a a a b b c ; pred a a b b c c
    m = compute_metrics(list("aaabbc"), list("aabbcc"), LABELS)
    # per class: a P=1 R=2/3 F=0.8; b P=1/2 R=1/2 F=0.5; c P=1/2 R=1 F=2/3
    # sklearn's float64 arithmetic on counts <= 6 differs from these expressions by a few roundings
    # (relative error ~1e-15, IEEE double on any CPU); approx's default rel=1e-6 is far above that
    assert m["per_class_f1"] == pytest.approx({"a": 80.0, "b": 50.0, "c": 200 / 3})
    assert m["accuracy"] == pytest.approx(400 / 6)
    assert m["weighted_f1"] == pytest.approx(100 * (3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)
    assert m["uar"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert m["war"] == m["accuracy"]  # the same accuracy_score call, times 100: identical
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def _pred(keys, preds):
    t = pa.table({"dialogue_id": [k[0] for k in keys], "turn": [k[1] for k in keys], "emotion_pred": preds})
    return t.replace_schema_metadata({"emotion_labels": json.dumps(LABELS)})


def test_evaluate_joins_on_keys_and_accounts_for_every_row():
    gold = pa.table({"dialogue_id": ["d1", "d1", "d2"], "turn": [0, 3, 0], "label": ["a", "b", "c"]})
    m = evaluate_predictions(_pred([("d2", 0), ("d1", 3), ("d1", 0)], ["c", "a", "a"]), gold)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["n"] == 3  # 100 * 2/3 vs 200/3: within 2 ulp, rel=1e-6
    with pytest.raises(ValueError, match="not predicted"):
        evaluate_predictions(_pred([("d1", 0), ("d1", 3)], ["a", "b"]), gold)
    with pytest.raises(ValueError, match="no gold"):
        evaluate_predictions(_pred([("d1", 0), ("d1", 3), ("d2", 0), ("d9", 0)], list("abca")), gold)


def test_report_mean_std_and_files(tmp_path):
    m1 = compute_metrics(list("aaabbc"), list("aabbcc"), LABELS)
    m2 = compute_metrics(list("aaabbc"), list("aaabbc"), LABELS)
    rep = build_report({0: {"test": m1}, 1: {"test": m2}}, tmp_path, title="t")
    assert rep["seeds"] == [0, 1]
    # mean/std of two float64 values (numpy) vs these expressions: a few roundings apart (~1e-14 relative)
    assert rep["test"]["accuracy"] == pytest.approx((400 / 6 + 100) / 2)
    assert rep["test"]["accuracy_std"] == pytest.approx((100 - 400 / 6) / 2)
    assert rep["test"]["per_class_f1"]["a"] == pytest.approx(90.0)
    assert rep["test"]["confusion"] == [[5, 1, 0], [0, 3, 1], [0, 0, 2]]
    for f in ("report.json", "report.md", "confusion_test.png", "per_class_f1_test.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    assert "± " in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["test"]["n_seeds"] == 2
