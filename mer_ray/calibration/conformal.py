"""Split-conformal prediction sets with the LAC score ``1 - p[label]`` (Sadinle, Lei and Wasserman, 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def lac_threshold(scores: Sequence[float], alpha: float) -> float:
    """The conformal quantile: the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score.

    With fewer scores than that rank needs, the threshold is 1 (every label is included), which
    keeps the coverage guarantee; :func:`alpha_floor` says which alphas avoid this.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * (1 - alpha))
    return 1.0 if k > len(s) else float(s[k - 1])


def alpha_floor(n: int) -> float:
    """The smallest alpha whose quantile rank fits ``n`` calibration scores: ``1 / (n + 1)``."""
    return 1.0 / (n + 1)


def prediction_set(probs: np.ndarray, thresholds: np.ndarray, labels: Sequence[str]) -> list[str]:
    """Labels whose score ``1 - p`` is within their threshold, by probability; the argmax always belongs.

    Args:
        probs: [C] calibrated probabilities.
        thresholds: [C] per-label thresholds (all equal for the marginal method).
        labels: the C label names.
    """
    order = np.argsort(-probs, kind="stable")
    keep = [labels[i] for i in order if 1.0 - probs[i] <= thresholds[i]]
    top = labels[order[0]]
    return keep if top in keep else [top] + keep


def lac_scores(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nonconformity scores ``1 - p[gold]`` [N] of calibrated ``probs`` [N, C] and gold indices ``y`` [N]."""
    probs = np.asarray(probs, dtype=np.float64)
    return 1.0 - probs[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
