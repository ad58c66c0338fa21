"""How well probabilities are calibrated: top-label ECE, NLL, and the reliability diagram.

(Named ``reliability`` rather than ``metrics``: module base names are unique across the package, and
``mer_ray.eval.metrics`` holds the classification metrics.)

Shapes: ``N`` utterances, ``C`` labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # equal-width bins (lower, upper]; a confidence of exactly 0 joins the first bin
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin counts, mean confidence and accuracy of the top label.

    Args:
        probs: [N, C] probabilities.
        y: [N] gold label indices.
        n_bins: equal-width confidence bins over [0, 1].

    Returns:
        ``{"count": [B], "confidence": [B], "accuracy": [B]}``; empty bins have NaN confidence and accuracy.
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf, correct = probs.max(1), (probs.argmax(1) == np.asarray(y)).astype(np.float64)
    b = _bins(conf, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    return {"count": count, "confidence": mean_conf, "accuracy": acc}


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error: ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` (Guo et al., 2017).

    Args:
        probs: [N, C] probabilities.
        y: [N] gold label indices.
        n_bins: equal-width confidence bins over [0, 1] (15, as the issue and Guo et al. use).

    Returns:
        ECE in [0, 1].
    """
    r = reliability_bins(probs, y, n_bins)
    ok = r["count"] > 0
    return float(np.sum(r["count"][ok] / r["count"].sum() * np.abs(r["accuracy"][ok] - r["confidence"][ok])))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the gold labels (sklearn ``log_loss`` over all ``C`` labels).

    Args:
        probs: [N, C] probabilities (renormalised here: stored float32 rows sum to 1 only approximately).
        y: [N] gold label indices.
    """
    from sklearn.metrics import log_loss

    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)
    p /= p.sum(1, keepdims=True)
    return float(log_loss(np.asarray(y), p, labels=np.arange(p.shape[1])))


def reliability_diagram(panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path,
                        n_bins: int = 15, title: str | None = None) -> Path:
    """One panel per model: accuracy against confidence per bin, before and after calibration.

    Args:
        panels: ``{panel title: (probs_before [N, C], probs_after [N, C], y [N])}``.
        path: the PNG to write.
        n_bins: equal-width confidence bins.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    for ax, (name, (before, after, y)) in zip(axes.ravel(), panels.items()):
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":")
        for probs, label, color, dx in ((before, "before", "tab:gray", -0.012), (after, "after", "tab:red", 0.012)):
            r = reliability_bins(probs, y, n_bins)
            ok = r["count"] > 0
            ax.bar(centers[ok] + dx, r["accuracy"][ok], width=0.9 / n_bins / 2, color=color, alpha=0.8,
                   label=f"{label} (ECE {100 * ece(probs, y, n_bins):.1f}%)")
            ax.plot(r["confidence"][ok], r["accuracy"][ok], "o", color=color, ms=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top label)")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def topk_coverage(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of rows whose gold label is among the ``k`` most probable; ``probs`` [N, C], ``y`` [N]."""
    rank = (np.asarray(probs) > np.asarray(probs)[np.arange(len(y)), y][:, None]).sum(1)
    return float(np.mean(rank < k))


def smallest_topk(probs: np.ndarray, y: np.ndarray, target: float, ks: Sequence[int] | None = None) -> int:
    """The smallest fixed ``k`` whose top-k coverage on (``probs`` [N, C], ``y`` [N]) reaches ``target``."""
    ks = ks or range(1, np.asarray(probs).shape[1] + 1)
    return next((k for k in ks if topk_coverage(probs, y, k) >= target), max(ks))
