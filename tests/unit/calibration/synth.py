"""Synthetic calibration data: logits ``z``, gold drawn from ``softmax(z / T)``, so ``softmax(z)`` is
miscalibrated by exactly ``T`` and ``softmax(z / T)`` is perfectly calibrated."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def draw(n: int, c: int = 7, t: float = 2.0, seed: int = 0, scale: float = 3.0,
         prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z [n, c], y [n], calibrated probs [n, c])``; ``prior`` [c] adds log-prior to the logits (imbalance)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, c))
    if prior is not None:
        z = z + t * np.log(prior)  # rare classes rarely win, as MELD's fear and disgust
    p = softmax(z / t)
    u = rng.random((n, 1))
    y = np.minimum((p.cumsum(1) < u).sum(1), c - 1)  # inverse-CDF draw, vectorised
    return z, y, p


def dialogues(n: int, per: int = 5) -> np.ndarray:
    """[n] dialogue ids, ``per`` turns each."""
    return np.array([f"d{i // per}" for i in range(n)])
