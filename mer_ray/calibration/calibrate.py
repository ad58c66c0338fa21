"""Fit a :class:`~mer_ray.calibration.artifacts.Calibration` from dev distributions.

1. A temperature per distribution name, fitted on every dev row that has that distribution.
2. For the served distributions (``final_llm``, ``final_no_llm``): split-conformal LAC scores on
   *out-of-fold* calibrated dev probabilities (:func:`~mer_ray.calibration.temperature.crossfit_temperature`),
   in the model's label set and in every label set a written-down mapping reaches
   (:data:`mer_ray.data.labels.MAPPINGS`). Rows whose gold maps to ``None`` are left out of that set.

(Named ``calibrate`` rather than ``fit``: module base names are unique across the package, and
``mer_ray.lantern.fit`` is the fusion's.)

Shapes: ``N`` dev utterances, ``C`` model labels, ``C'`` labels of a mapped set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mer_ray.calibration.artifacts import Calibration, ConformalScores
from mer_ray.calibration.conformal import alpha_floor, lac_scores
from mer_ray.calibration.temperature import crossfit_temperature, fit_temperature
from mer_ray.data.labelmap import mapping_matrix, project
from mer_ray.data.labels import LABEL_SETS, MAPPINGS

METHODS = ("class_conditional_lac", "lac")
#: The distributions ``probs`` can be (per ``use_llm``); only these get prediction sets.
CONFORMAL_NAMES = ("final_llm", "final_no_llm")
#: A label needs this many dev scores for its own threshold; rarer labels take the marginal one.
#: ``alpha_floor(19) = 0.05``, so every per-label list used supports alpha down to 0.05.
MIN_CLASS_SCORES = 19
ALPHA_HIGH = 0.5


def label_set_name(labels: Sequence[str]) -> str:
    """The registered label set whose labels are ``labels`` in order (``custom`` if none), as Serve names it."""
    return next((n for n, s in LABEL_SETS.items() if tuple(s.labels) == tuple(labels)), "custom")


def reachable_label_sets(label_set: str, labels: Sequence[str]) -> dict[str, tuple[list[str], np.ndarray | None, dict]]:
    """Every label set a request may ask for: ``{name: (labels [C'], projection [C, C'] or None, gold map)}``.

    The projection sums model-label mass into the target labels (a label mapped to ``None`` drops
    out); :func:`mer_ray.data.labelmap.project` then renormalises: the same two functions Serve's
    ``label_map`` uses, so sets are calibrated on exactly what Serve answers. The gold map sends a model
    label to its target (or ``None``).
    """
    out: dict[str, tuple[list[str], np.ndarray | None, dict]] = {label_set: (list(labels), None, {lab: lab for lab in labels})}
    for (src, tgt), mapping in sorted(MAPPINGS.items()):
        if src != label_set:
            continue
        tgt_labels = list(LABEL_SETS[tgt].labels)
        out[tgt] = (tgt_labels, mapping_matrix(labels, tgt_labels, mapping), dict(mapping))
    return out


def conformal_scores(probs: np.ndarray, y: np.ndarray, labels: Sequence[str], target_labels: Sequence[str],
                     proj: np.ndarray | None, gold_map: dict, min_class_scores: int = MIN_CLASS_SCORES) -> tuple[ConformalScores, dict]:
    """LAC scores of calibrated ``probs`` [N, C] (model labels) in one label set.

    Args:
        probs: [N, C] calibrated (out-of-fold) probabilities in the model's label order.
        y: [N] gold indices into ``labels``.
        labels: the C model labels.
        target_labels: the C' labels of the set.
        proj: [C, C'] projection (None: the model's own set).
        gold_map: model label -> target label or None (such rows are dropped).
        min_class_scores: labels with fewer dev scores get no per-label list (they use the marginal threshold).

    Returns:
        The scores, and ``{"n", "dropped", "marginal_fallback"}`` for provenance.
    """
    p = probs if proj is None else project(probs, proj)
    tgt = [gold_map[labels[i]] for i in y]
    keep = np.array([t is not None for t in tgt], dtype=bool)
    yt = np.array([list(target_labels).index(t) for t in tgt if t is not None], dtype=np.int64)
    s = lac_scores(p[keep], yt)
    per_label, fallback = {}, []
    for j, lab in enumerate(target_labels):
        mine = np.sort(s[yt == j])
        if len(mine) >= min_class_scores:
            per_label[lab] = mine.tolist()
        else:
            fallback.append(lab)
    sc = ConformalScores(labels=list(target_labels), all=np.sort(s).tolist(), per_label=per_label)
    return sc, {"n": int(keep.sum()), "dropped": int((~keep).sum()), "marginal_fallback": fallback}


def supported_alpha_low(conformal: dict[str, dict[str, ConformalScores]], method: str) -> float:
    """The smallest alpha (rounded up to 2 decimals) whose quantile rank fits every score list the method uses."""
    floors = [alpha_floor(len(sc.all)) for sets in conformal.values() for sc in sets.values()]
    if method == "class_conditional_lac":
        floors += [alpha_floor(len(v)) for sets in conformal.values() for sc in sets.values() for v in sc.per_label.values()]
    return math.ceil(max(floors, default=0.01) * 100 - 1e-9) / 100


def fit_calibration(dists: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, labels: Sequence[str], *,
                    label_set: str | None = None, conformal_names: Sequence[str] = CONFORMAL_NAMES,
                    method: str = "class_conditional_lac", alpha: float = 0.1, k: int = 5, seed: int = 0,
                    min_class_scores: int = MIN_CLASS_SCORES, fitted_on: dict | None = None) -> Calibration:
    """Temperatures for every distribution and conformal scores for the served ones, all from dev.

    Args:
        dists: ``{name: [N, C] dev probabilities}``; a row of NaN means the distribution has no value
            there (e.g. no LLM field covered the utterance). Every dev model must be out of fold
            (not fitted on these rows); the caller says how in ``fitted_on``.
        y: [N] gold indices into ``labels``.
        groups: [N] dialogue ids (cross-fitting folds).
        labels: the C model labels.
        label_set: their registered name (default: looked up from ``labels``).
        conformal_names: the names that get prediction sets (those present in ``dists``).
        method: ``class_conditional_lac`` (a threshold per gold label, so the rare classes are
            covered too) or ``lac`` (one marginal threshold).
        alpha: the default miscoverage.
        k: cross-fitting folds over dialogues for the out-of-fold temperatures.
        seed: fold seed.
        min_class_scores: see :func:`conformal_scores`.
        fitted_on: provenance from the caller (sources, out-of-fold flags), merged into the file's.

    Returns:
        The calibration (not yet saved).

    Raises:
        ValueError: an unknown method, or a dev set too small for ``alpha``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown conformal method {method!r}; expected one of {list(METHODS)}")
    labels = list(labels)
    label_set = label_set or label_set_name(labels)
    y, groups = np.asarray(y, dtype=np.int64), np.asarray(groups)
    temps, rows, folds_t, conformal, sets_info = {}, {}, {}, {}, {}
    for name, p in dists.items():
        p = np.asarray(p, dtype=np.float64)
        ok = np.isfinite(p).all(1)
        if not ok.any():
            continue
        temps[name] = fit_temperature(p[ok], y[ok])
        rows[name] = int(ok.sum())
        if name not in conformal_names:
            continue
        oof, folds_t[name] = crossfit_temperature(p[ok], y[ok], groups[ok], k, seed, return_temperatures=True)
        conformal[name], sets_info[name] = {}, {}
        for ls, (tgt, proj, gmap) in reachable_label_sets(label_set, labels).items():
            conformal[name][ls], sets_info[name][ls] = conformal_scores(oof, y[ok], labels, tgt, proj, gmap, min_class_scores)
    low = supported_alpha_low(conformal, method) if conformal else 0.01
    if low > alpha:
        raise ValueError(f"the dev set supports alpha >= {low} only (smallest score list: "
                         f"{'per label' if method != 'lac' else 'marginal'}), below the requested default {alpha}; "
                         f"use a larger dev set or a larger alpha")
    prov = {"split": "dev", "n": int(len(y)), "n_dialogues": int(len(np.unique(groups))), "rows": rows,
            "temperature": "one T per distribution: NLL minimised over log T (scipy bounded Brent), all dev rows",
            "conformal": {"scores": f"LAC 1 - p[gold] on out-of-fold calibrated dev probabilities ({k} folds over "
                                    f"dialogues, seed {seed}: each row's temperature was fitted on the other folds)",
                          "fold_temperatures": folds_t, "label_sets": sets_info, "min_class_scores": min_class_scores}}
    return Calibration(label_set=label_set, labels=labels, temperatures=temps, method=method, alpha_default=alpha,
                       alpha_range=(low, ALPHA_HIGH), conformal=conformal, fitted_on={**prov, **(fitted_on or {})})


def fit_sources(src, *, method: str = "class_conditional_lac", alpha: float = 0.1, k: int = 5, seed: int = 0) -> Calibration:
    """:func:`fit_calibration` on a :class:`~mer_ray.calibration.sources.Sources`' dev split, with its provenance."""
    return fit_calibration(src.dev.probs, src.dev.y, src.dev.groups, src.labels, method=method, alpha=alpha, k=k, seed=seed,
                           fitted_on=src.provenance)


def fit_dir(models_dir, *, method: str = "class_conditional_lac", alpha: float = 0.1, k: int = 5, seed: int = 0,
            strict: bool = True, **sources) -> Calibration | None:
    """Fit from a models dir's dev distributions and write ``<models_dir>/calibration.json`` (what the pipelines call).

    ``sources`` go to :func:`~mer_ray.calibration.sources.load_sources` (``meld``, ``manifest``, ``gold``,
    ``lantern``, ``vanilla``). With ``strict=False`` a dev set that cannot be calibrated (too small, no dev
    predictions) is reported and skipped, returning None, and an older ``calibration.json`` is removed: it
    belonged to other models, and Serve must then answer ``calibrated: false``.
    """
    from pathlib import Path

    from mer_ray.calibration.artifacts import CALIBRATION_FILE
    from mer_ray.calibration.sources import load_sources

    try:
        cal = fit_sources(load_sources(models_dir, **sources), method=method, alpha=alpha, k=k, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        if strict:
            raise
        (Path(models_dir) / CALIBRATION_FILE).unlink(missing_ok=True)
        print(f"[calibration] {models_dir}: skipped, served uncalibrated ({type(e).__name__}: {e})", flush=True)
        return None
    path = cal.save(models_dir)
    print(f"[calibration] {path}: T = {', '.join(f'{n} {t:.3f}' for n, t in cal.temperatures.items())}; "
          f"{cal.method}, alpha {cal.alpha_default} in {list(cal.alpha_range)}", flush=True)
    return cal
