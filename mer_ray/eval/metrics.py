"""Classification metrics with scikit-learn, in percent (0-100).

UAR is the unweighted mean of per-class recall (``balanced_accuracy``); WAR is
recall weighted by class support, which equals accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score


def compute_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Weighted F1, accuracy, macro F1, per-class F1, UAR and WAR, in percent.

    Args:
        y_true: gold labels, one per utterance.
        y_pred: predicted labels, same length.
        labels: the label set, in its canonical order (classes absent from
            ``y_true`` still get a per-class entry).
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on zero utterances")
    labels = list(labels)
    unknown = sorted(set(y_true) - set(labels)) + sorted(set(y_pred) - set(labels))
    if unknown:
        raise ValueError(f"labels outside the label set {labels}: {unknown}")
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    present = [lab for lab in labels if lab in set(y_true)]
    return {
        "n": len(y_true),
        "weighted_f1": 100.0 * f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
        "accuracy": 100.0 * accuracy_score(y_true, y_pred),
        "macro_f1": 100.0 * f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0),
        "uar": 100.0 * balanced_accuracy_score(y_true, y_pred),
        "war": 100.0 * accuracy_score(y_true, y_pred),
        "per_class_f1": {lab: 100.0 * float(f) for lab, f in zip(labels, per_class)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": labels,
    }


def aggregate_seeds(runs: Sequence[dict], keys: Sequence[str] = ("weighted_f1", "accuracy", "macro_f1", "uar", "war")) -> dict:
    """Mean and (population) std over seeds: ``{k: mean, k + "_std": std}`` plus mean per-class F1."""
    if not runs:
        raise ValueError("no runs to aggregate")
    out: dict = {}
    for k in keys:
        vals = np.array([r[k] for r in runs], dtype=float)
        out[k] = float(vals.mean())
        out[k + "_std"] = float(vals.std())
    labels = runs[0]["per_class_f1"].keys()
    out["per_class_f1"] = {lab: float(np.mean([r["per_class_f1"][lab] for r in runs])) for lab in labels}
    out["per_class_f1_std"] = {lab: float(np.std([r["per_class_f1"][lab] for r in runs])) for lab in labels}
    out["n_seeds"] = len(runs)
    return out
