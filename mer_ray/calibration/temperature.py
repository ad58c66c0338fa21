"""Temperature scaling (Guo et al., 2017) of probability vectors: one scalar per distribution, fitted on dev."""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """``softmax(log p / t)`` over the last axis.

    Args:
        probs: [..., C] probabilities (rows sum to 1).
        t: temperature > 0; > 1 softens, < 1 sharpens. Monotone, so the argmax never changes.

    Returns:
        [..., C] float64 probabilities.
    """
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None)) / t
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _nll_at(logp: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of gold ``y`` [N] under ``softmax(logp / t)``; ``logp`` [N, C]."""
    z = logp / t
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(probs: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the NLL of ``y`` under :func:`apply_temperature` (Guo et al., 2017).

    The search is over ``log t`` (scipy's bounded Brent), so softening and sharpening are searched
    symmetrically; the NLL is convex in ``1 / t``, so the one minimum found is the global one.

    Args:
        probs: [N, C] probabilities of N utterances.
        y: [N] gold label indices into the C columns.
        bounds: the range of ``t`` searched.

    Returns:
        The fitted temperature ``t > 0``.
    """
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None))
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("fit_temperature needs at least one row")
    res = minimize_scalar(lambda lt: _nll_at(logp, y, float(np.exp(lt))), bounds=tuple(np.log(bounds)),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def group_folds(groups: np.ndarray, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``k`` folds of whole groups (dialogues), groups shuffled by ``seed``.

    Args:
        groups: [N] group id (dialogue id) of each row.
        k: folds; fewer when there are fewer groups.
        seed: shuffling seed of ``GroupKFold``.

    Returns:
        ``k`` arrays of held-out row indices; together they cover every row once.
    """
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    k = min(k, len(np.unique(groups)))
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 groups (dialogues), got {len(np.unique(groups))}")
    cv = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in cv.split(np.zeros(len(groups)), groups=groups)]


def crossfit_temperature(probs: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0,
                         return_temperatures: bool = False) -> np.ndarray | tuple[np.ndarray, list[float]]:
    """Out-of-fold calibrated probabilities: each fold is scaled by a temperature fitted on the other folds.

    Conformal scores are computed on these, so no score comes from a temperature fitted on its own row.

    Args:
        probs: [N, C] dev probabilities.
        y: [N] gold indices.
        groups: [N] dialogue ids (a dialogue never straddles folds: its turns are not exchangeable).
        k: folds.
        seed: fold seed.
        return_temperatures: also return the k fold temperatures (provenance).

    Returns:
        [N, C] calibrated out-of-fold probabilities (and the fold temperatures, if asked).
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    out = np.empty_like(probs)
    temps = []
    for held in group_folds(groups, k, seed):
        rest = np.setdiff1d(np.arange(len(y)), held)
        t = fit_temperature(probs[rest], y[rest])
        out[held] = apply_temperature(probs[held], t)
        temps.append(t)
    return (out, temps) if return_temperatures else out
