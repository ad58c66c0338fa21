"""Split-conformal LAC sets: the coverage guarantee, set properties, class-conditional thresholds,
the marginal fallback, mapped label sets and the supported alpha range."""

from __future__ import annotations

import numpy as np
import pytest

from mer_ray.calibration.artifacts import Calibration, ConformalScores
from mer_ray.calibration.calibrate import fit_calibration, reachable_label_sets
from mer_ray.calibration.conformal import lac_scores, lac_threshold, prediction_set
from mer_ray.data.labels import get_label_set
from tests.unit.calibration.synth import dialogues, draw, softmax

MELD7 = list(get_label_set("meld7").labels)


def test_split_conformal_coverage_on_exchangeable_data():
    """With n exchangeable calibration scores and no ties, the split-conformal quantile (rank ceil((n+1)(1-a)))
    gives P(test score <= q) in [1 - a, 1 - a + 1/(n+1)] (Vovk et al. 2005; Lei et al. 2018), the probability
    taken over calibration *and* test draws. We estimate it by the mean test coverage over R random
    calibration/test splits of one exchangeable pool. One split's coverage varies by about
    sqrt(a(1-a)/(n+2)) (its Beta law given the calibration set) plus sqrt(a(1-a)/m) (m test rows); the mean over
    R splits by that over sqrt(R). The margin is 4 of those standard errors on both sides (the bound is on
    the expectation, so a sample mean may fall a little below 1 - a)."""
    alpha, n, m, reps = 0.1, 500, 2_000, 300
    z, y, _ = draw(40_000, t=1.5, seed=0)
    scores = lac_scores(softmax(z), y)  # any fixed score function works; this one is miscalibrated on purpose
    rng = np.random.default_rng(1)
    cov = []
    for _ in range(reps):
        idx = rng.permutation(len(scores))[: n + m]
        q = lac_threshold(scores[idx[:n]], alpha)
        cov.append(np.mean(scores[idx[n:]] <= q))
    se = np.sqrt(alpha * (1 - alpha) / (n + 2) + alpha * (1 - alpha) / m) / np.sqrt(reps)
    margin = 4 * se
    assert 1 - alpha - margin <= np.mean(cov) <= 1 - alpha + 1 / (n + 1) + margin, (np.mean(cov), margin)


def test_threshold_rank_and_the_too_few_scores_case():
    s = np.arange(1, 20) / 20  # 19 scores: rank ceil(20 * 0.9) = 18
    assert lac_threshold(s, 0.1) == pytest.approx(s[17])
    assert lac_threshold(s[:5], 0.1) == 1.0  # rank 6 > 5 scores: every label


def test_sets_are_never_empty_ordered_and_hold_the_argmax():
    _, y, p = draw(3_000, seed=2)
    cal = fit_calibration({"final_llm": p[:1500]}, y[:1500], dialogues(1500), MELD7)
    probs = cal.calibrate("final_llm", p[1500:])
    for alpha in (cal.alpha_range[0], 0.1, 0.3, cal.alpha_range[1]):
        for row, s in zip(probs, cal.prediction_sets("final_llm", "meld7", probs, alpha)):
            assert s and s[0] == MELD7[int(row.argmax())]
            ps = [row[MELD7.index(lab)] for lab in s]
            assert ps == sorted(ps, reverse=True) and len(set(s)) == len(s)
    # even a threshold below every score keeps the argmax
    assert prediction_set(np.array([0.5, 0.3, 0.2]), np.zeros(3), ["a", "b", "c"]) == ["a"]
    # larger alpha, smaller sets
    sizes = [np.mean([len(s) for s in cal.prediction_sets("final_llm", "meld7", probs, a)]) for a in (0.05, 0.1, 0.3)]
    assert sizes[0] >= sizes[1] >= sizes[2]


def test_class_conditional_covers_every_class_where_marginal_misses_the_rare_ones():
    """Imbalanced classes (the last two at 3% and 2%, as MELD's fear and disgust): the class-conditional
    thresholds give each class 1 - alpha (up to a sampling margin of ~3 standard errors of a class's test
    coverage plus its calibration quantile); one marginal threshold over-covers the frequent classes and
    under-covers the rare ones."""
    prior = np.array([0.45, 0.17, 0.13, 0.12, 0.08, 0.03, 0.02])
    _, y, p = draw(60_000, t=1.0, seed=3, prior=prior, scale=1.5)
    n = 20_000
    alpha = 0.1
    cal = fit_calibration({"final_llm": p[:n]}, y[:n], dialogues(n), MELD7, alpha=alpha)
    probs, yt = p[n:], y[n:]
    for method in ("class_conditional_lac", "lac"):
        sets = cal.model_copy(update={"method": method}).prediction_sets("final_llm", "meld7", probs, alpha)
        hit = np.array([MELD7[g] in s for s, g in zip(sets, yt)])
        per = {j: hit[yt == j].mean() for j in range(7)}
        if method == "class_conditional_lac":
            for j, c in per.items():
                n_cal, n_test = (y[:n] == j).sum(), (yt == j).sum()
                margin = 3 * np.sqrt(alpha * (1 - alpha) * (1 / n_test + 1 / n_cal))
                assert c >= 1 - alpha - margin, (MELD7[j], c, margin)
        else:
            assert hit.mean() == pytest.approx(1 - alpha, abs=0.01)
            assert min(per[5], per[6]) < 1 - alpha - 0.05  # the rare classes pay for the marginal guarantee


def test_a_label_without_calibration_rows_takes_the_marginal_threshold():
    sc = ConformalScores(labels=["a", "b", "c"], all=np.linspace(0.01, 0.9, 99).tolist(),
                         per_label={"a": [0.0] * 50, "b": [0.95] * 50})
    cal = Calibration(label_set="x", labels=["a", "b", "c"], temperatures={}, alpha_range=(0.05, 0.5),
                      conformal={"final_llm": {"x": sc}})
    q_all = lac_threshold(sc.all, 0.1)
    p = np.array([[0.2, 0.1, 1 - q_all + 1e-6], [0.5, 0.3, 1 - q_all - 1e-3]])
    sets = cal.prediction_sets("final_llm", "x", p, 0.1)
    assert "c" in sets[0] and "c" not in sets[1]  # c is judged by the marginal threshold
    assert "b" in sets[0] and "b" in sets[1]  # b's own threshold (0.95) admits p >= 0.05


def test_mapped_label_sets_project_like_serve_and_drop_unmapped_gold():
    sets = reachable_label_sets("meld7", MELD7)
    assert set(sets) == {"meld7", "meld_sentiment3", "emorynlp7", "iemocap4"}
    labels, proj, gmap = sets["meld_sentiment3"]
    p = np.array([[0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1]])
    from mer_ray.data.labelmap import project

    # surprise (0.3) has no sentiment: dropped, the rest renormalised (Serve's as_dist does the same)
    np.testing.assert_allclose(project(p, proj), [[0.1 / 0.7, 0.2 / 0.7, 0.4 / 0.7]])
    assert gmap["surprise"] is None

    _, y, probs = draw(4_000, seed=4)
    cal = fit_calibration({"final_llm": probs, "final_no_llm": probs}, y, dialogues(4_000), MELD7)
    info = cal.fitted_on["conformal"]["label_sets"]["final_llm"]
    assert set(cal.conformal["final_llm"]) == set(sets)
    assert info["meld_sentiment3"]["dropped"] == int((y == MELD7.index("surprise")).sum())
    assert info["emorynlp7"]["dropped"] == int(np.isin(y, [MELD7.index("surprise"), MELD7.index("disgust")]).sum())
    emory = cal.conformal["final_llm"]["emorynlp7"]
    assert emory.labels == list(get_label_set("emorynlp7").labels)
    assert "peaceful" not in emory.per_label and "peaceful" in info["emorynlp7"]["marginal_fallback"]
    out = cal.prediction_sets("final_llm", "iemocap4", project(cal.calibrate("final_llm", probs[:50]), sets["iemocap4"][1]))
    assert len(out) == 50 and all(s and set(s) <= {"happy", "sad", "neutral", "angry"} for s in out)
    assert cal.prediction_sets("llm", "meld7", probs[:2]) is None  # no scores for that name


def test_alpha_range_follows_the_smallest_class_and_is_enforced():
    _, y, p = draw(2_000, seed=5)
    y[:30] = 6  # fear: at least 30 rows
    y[30:] = np.where(y[30:] == 6, 0, y[30:])
    cal = fit_calibration({"final_llm": p}, y, dialogues(2_000), MELD7)
    assert cal.alpha_range == (pytest.approx(np.ceil(100 / 31) / 100), 0.5)  # alpha_floor(30) = 1/31 -> 0.04
    assert cal.fitted_on["conformal"]["label_sets"]["final_llm"]["meld7"]["n"] == 2000
    lo, hi = cal.alpha_range
    with pytest.raises(ValueError, match=rf"\[{lo}, {hi}\]"):
        cal.prediction_sets("final_llm", "meld7", p[:3], 0.01)
    with pytest.raises(ValueError, match="outside the range"):
        cal.check_alpha(0.6)
    marginal = fit_calibration({"final_llm": p}, y, dialogues(2_000), MELD7, method="lac")
    assert marginal.alpha_range[0] == 0.01 and marginal.method == "lac"
    with pytest.raises(ValueError, match="unknown conformal method"):
        fit_calibration({"final_llm": p}, y, dialogues(2_000), MELD7, method="aps")


def test_a_dev_set_too_small_for_the_default_alpha_is_refused():
    _, y, p = draw(8, seed=6)
    with pytest.raises(ValueError, match="supports alpha >="):
        fit_calibration({"final_llm": p}, y, dialogues(8, per=2), MELD7)
