"""The test report of a fitted calibration: ECE and NLL before/after, and the conformal sets' coverage.

Everything here reads test gold for scoring only; nothing is fitted or chosen on test (the top-k
baseline's ``k`` is chosen on dev).

Shapes: ``N`` test utterances, ``C`` model labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mer_ray.calibration.artifacts import Calibration
from mer_ray.calibration.calibrate import reachable_label_sets
from mer_ray.calibration.reliability import ece, nll, reliability_diagram, smallest_topk, topk_coverage
from mer_ray.calibration.sources import Sources
from mer_ray.data.labelmap import project


def _rows(p: np.ndarray) -> np.ndarray:
    return np.isfinite(p).all(1)


def calibration_table(cal: Calibration, src: Sources, n_bins: int = 15) -> dict[str, dict]:
    """``{name: {n, temperature, ece_before, ece_after, nll_before, nll_after, argmax_changed}}`` on test."""
    out = {}
    for name, t in cal.temperatures.items():
        p = src.test.probs.get(name)
        if p is None:
            continue
        ok = _rows(p)
        before, y = p[ok], src.test.y[ok]
        after = cal.calibrate(name, before)
        out[name] = {"n": int(ok.sum()), "temperature": round(t, 4),
                     "ece_before": ece(before, y, n_bins), "ece_after": ece(after, y, n_bins),
                     "nll_before": nll(before, y), "nll_after": nll(after, y),
                     "argmax_changed": int((before.argmax(1) != after.argmax(1)).sum())}
    return out


def set_stats(sets: Sequence[Sequence[str]], gold: Sequence[str], labels: Sequence[str]) -> dict:
    """Coverage (overall and per gold label), mean set size and the set-size histogram of conformal sets."""
    hit = np.array([g in s for s, g in zip(sets, gold)])
    sizes = np.array([len(s) for s in sets])
    gold = np.asarray(gold)
    per = {lab: float(hit[gold == lab].mean()) for lab in labels if (gold == lab).any()}
    return {"n": len(sets), "coverage": float(hit.mean()), "coverage_per_class": per,
            "n_per_class": {lab: int((gold == lab).sum()) for lab in labels if (gold == lab).any()},
            "mean_set_size": float(sizes.mean()),
            "set_size_counts": {str(k): int((sizes == k).sum()) for k in range(1, len(labels) + 1) if (sizes == k).any()},
            "empty_sets": int((sizes == 0).sum())}


def conformal_report(cal: Calibration, src: Sources, name: str, alpha: float | None = None) -> dict | None:
    """Test coverage of ``name``'s sets in the model's label set, with the method, the other LAC variant beside
    it, the top-k baseline (k chosen on dev) and each mapped label set; None when ``name`` has no scores."""
    if not cal.has_sets(name, cal.label_set) or name not in src.test.probs:
        return None
    alpha = cal.alpha_default if alpha is None else alpha
    labels = cal.labels
    p = src.test.probs[name]
    ok = _rows(p)
    probs, y = cal.calibrate(name, p[ok]), src.test.y[ok]
    gold = [labels[i] for i in y]
    variants = {}
    for method in ("class_conditional_lac", "lac"):
        sets = cal.model_copy(update={"method": method}).prediction_sets(name, cal.label_set, probs, alpha)
        variants[method] = set_stats(sets, gold, labels)
        variants[method]["argmax_always_in_set"] = all(labels[i] in s for i, s in zip(probs.argmax(1), sets))
    dp = src.dev.probs[name]
    dok = _rows(dp)
    k = smallest_topk(dp[dok], src.dev.y[dok], 1 - alpha)  # order only: temperature never changes it
    topk = {"k": k, "chosen_on": "dev", "dev_coverage": topk_coverage(dp[dok], src.dev.y[dok], k),
            "coverage": topk_coverage(probs, y, k),
            "coverage_per_class": {lab: topk_coverage(probs[y == j], y[y == j], k) for j, lab in enumerate(labels) if (y == j).any()},
            "mean_set_size": float(k)}
    mapped = {}
    for ls, (tgt, proj, gmap) in reachable_label_sets(cal.label_set, labels).items():
        if proj is None or not cal.has_sets(name, ls):
            continue
        keep = np.array([gmap[g] is not None for g in gold])
        sets = cal.prediction_sets(name, ls, project(probs[keep], proj), alpha)
        s = set_stats(sets, [gmap[g] for g in np.asarray(gold)[keep]], tgt)
        mapped[ls] = {key: s[key] for key in ("n", "coverage", "coverage_per_class", "mean_set_size")}
    main = variants[cal.method]
    other = "lac" if cal.method != "lac" else "class_conditional_lac"
    return {"distribution": name, "alpha": alpha, "target_coverage": 1 - alpha, "method": cal.method, "label_set": cal.label_set,
            **main, "within_0.02": abs(main["coverage"] - (1 - alpha)) <= 0.02, "topk_baseline": topk,
            other: variants[other], "label_sets": mapped}


def measure(cal: Calibration, src: Sources, alpha: float | None = None, n_bins: int = 15) -> dict:
    """The ``docs/bench/calibration.json`` figures: ``test.<name>``, ``conformal`` (``final_llm``; ``final_no_llm``
    for a models dir without an LLM) and ``conformal_no_llm`` (``final_no_llm``)."""
    if src.test is None:
        raise ValueError("no test split to report on")
    table = calibration_table(cal, src, n_bins)
    no_llm = conformal_report(cal, src, "final_no_llm", alpha)
    # `conformal` is the served ensemble's (use_llm: true); a models dir without an LLM serves final_no_llm only
    out = {"test": table, "conformal": conformal_report(cal, src, "final_llm", alpha) or no_llm, "conformal_no_llm": no_llm}
    served = table.get("final_llm") or table.get("final_no_llm")
    goals = {}
    if served:
        goals["served_test_ece_le_0.05"] = served["ece_after"] <= 0.05
    for key in ("conformal", "conformal_no_llm"):
        if out[key]:
            goals[f"{key}_coverage_within_0.02"] = out[key]["within_0.02"]
    out["goals"] = goals
    return out


def plot_reliability(cal: Calibration, src: Sources, path: str | Path, n_bins: int = 15) -> Path:
    """The reliability diagram on test: one panel per distinct distribution (names sharing a source share a panel)."""
    groups: dict[str, list[str]] = {}
    for name in cal.temperatures:
        if name in src.test.probs:
            groups.setdefault(src.columns.get(name, name), []).append(name)
    panels = {}
    for col, names in groups.items():
        p = src.test.probs[names[0]]
        ok = _rows(p)
        t = cal.temperatures[names[0]]
        panels[f"{' = '.join(names)} ({col}), T = {t:.2f}"] = (p[ok], cal.calibrate(names[0], p[ok]), src.test.y[ok])
    return reliability_diagram(panels, path, n_bins, title=f"reliability on test, {n_bins} bins: before vs after temperature scaling")
