"""Paired bootstrap over test dialogues: confidence intervals of weighted-F1 gains.

Utterances of one dialogue are not independent, so a resample draws whole
dialogues with replacement; every system is scored on the same resamples
(paired). Weighted F1 is computed from per-dialogue confusion counts, so ``B``
resamples cost one ``[B, D] @ [D, C]`` product per count instead of ``B``
sklearn calls; on the full sample it equals sklearn's
``f1_score(average="weighted", labels=all labels, zero_division=0)``.

Shapes: ``N`` utterances, ``D`` dialogues, ``C`` labels, ``K`` systems, ``B`` resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 1000
SEED = 0
DECIMALS = 6  # percent; rounding hides float noise, so identical systems give a gain of exactly 0


def _counts(y: np.ndarray, pred: np.ndarray, group: np.ndarray, n_groups: int, n_classes: int) -> np.ndarray:
    """Per-dialogue counts ``[3, D, C]``: true positives, predicted, true."""
    out = np.zeros((3, n_groups, n_classes))
    np.add.at(out[0], (group[pred == y], y[pred == y]), 1)
    np.add.at(out[1], (group, pred), 1)
    np.add.at(out[2], (group, y), 1)
    return out


def _wf1(tp: np.ndarray, npred: np.ndarray, ntrue: np.ndarray) -> np.ndarray:
    """Weighted F1 (%) ``[...]`` from class counts ``[..., C]``: F1_c = 2 TP / (pred + true), weights = support."""
    denom = npred + ntrue
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return 100.0 * (f1 * ntrue).sum(-1) / ntrue.sum(-1)


def bootstrap_wf1(y: np.ndarray, preds: np.ndarray, dialogue_id: Sequence[str], n_classes: int,
                  n_boot: int = N_BOOT, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Weighted F1 of ``K`` systems on the full sample and on ``B`` paired dialogue resamples.

    Args:
        y: gold indices ``[N]``.
        preds: predicted indices ``[K, N]``.
        dialogue_id: each utterance's dialogue ``[N]``.
        n_classes: ``C``.
        n_boot: ``B``.
        seed: the resampling seed (one draw of dialogues, shared by all systems).

    Returns:
        ``(point [K], boot [B, K])``, in percent.
    """
    y, preds = np.asarray(y), np.atleast_2d(np.asarray(preds))
    _, group = np.unique(np.asarray(dialogue_id), return_inverse=True)
    n_groups = int(group.max()) + 1
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, n_groups, size=(n_boot, n_groups))
    weight = np.zeros((n_boot, n_groups))
    np.add.at(weight, (np.repeat(np.arange(n_boot), n_groups), draw.ravel()), 1)  # [B, D] multiplicities
    point, boot = [], []
    for p in preds:
        c = _counts(y, p, group, n_groups, n_classes)
        point.append(_wf1(*c.sum(1)))
        boot.append(_wf1(*(weight @ c)))  # [3, B, C]
    return np.array(point), np.stack(boot, 1)


def gain_ci(point: np.ndarray, boot: np.ndarray, coef: np.ndarray, level: float = 0.95) -> dict:
    """A linear gain ``coef @ wF1`` (e.g. ensemble minus a mean of baselines): point estimate and percentile CI.

    Args:
        point: ``[K]`` full-sample weighted F1.
        boot: ``[B, K]`` resampled weighted F1.
        coef: ``[K]`` weights of the gain.
        level: the CI's coverage.
    """
    g = boot @ coef
    lo, hi = np.percentile(g, [50 * (1 - level), 50 * (1 + level)])
    return {"point": round(float(point @ coef), DECIMALS), "ci95": [round(float(lo), DECIMALS), round(float(hi), DECIMALS)],
            "n_boot": int(boot.shape[0])}


def ensemble_gains(y: np.ndarray, ensemble: np.ndarray, seeds: Sequence[np.ndarray], seed_avg: np.ndarray,
                   dialogue_id: Sequence[str], n_classes: int, n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """Paired-bootstrap gains of the ensemble over the vanilla seeds (test dialogues resampled).

    Args:
        y: gold indices ``[N]``.
        ensemble: the ensemble's distributions ``[N, C]``.
        seeds: each vanilla seed's distributions ``[N, C]``.
        seed_avg: the vanilla seeds' average distribution ``[N, C]``.
        dialogue_id: ``[N]``.
        n_classes: ``C``.

    Returns:
        ``gain_vs_vanilla_mean`` (ensemble minus the mean over seeds of each seed's weighted F1) and
        ``gain_vs_vanilla_seed_avg`` (ensemble minus the seed average), each with ``point``, ``ci95``
        (``[low, high]``, percentage points), ``n_boot`` and ``seed``.
    """
    preds = np.stack([p.argmax(1) for p in (ensemble, seed_avg, *seeds)])
    point, boot = bootstrap_wf1(y, preds, dialogue_id, n_classes, n_boot, seed)
    k = len(seeds)
    vs_mean = np.array([1.0, 0.0] + [-1.0 / k] * k)
    vs_avg = np.array([1.0, -1.0] + [0.0] * k)
    return {"gain_vs_vanilla_mean": {**gain_ci(point, boot, vs_mean), "seed": seed},
            "gain_vs_vanilla_seed_avg": {**gain_ci(point, boot, vs_avg), "seed": seed}}
