"""Paired dialogue bootstrap: exact on the full sample, zero for identical systems, deterministic."""

from __future__ import annotations

import time

import numpy as np
from sklearn.metrics import f1_score

from mer_ray.ensemble.bootstrap import bootstrap_wf1, ensemble_gains


def _data(n_dialogues=280, n_turns=9, c=7, seed=0):
    rng = np.random.default_rng(seed)
    dia = np.repeat([f"test/{d}" for d in range(n_dialogues)], n_turns)
    y = rng.integers(c, size=dia.size)
    probs = [rng.dirichlet(np.ones(c), size=dia.size) for _ in range(3)]
    for p in probs:  # each system right about half of the time
        right = rng.random(dia.size) < 0.5
        p[right, y[right]] += 1.0
    return y, dia, [p / p.sum(1, keepdims=True) for p in probs]


def test_full_sample_weighted_f1_equals_sklearn():
    y, dia, probs = _data(n_dialogues=50)
    point, boot = bootstrap_wf1(y, np.stack([p.argmax(1) for p in probs]), dia, 7, n_boot=20)
    ref = [100 * f1_score(y, p.argmax(1), labels=range(7), average="weighted", zero_division=0) for p in probs]
    np.testing.assert_allclose(point, ref, rtol=0, atol=1e-9)
    assert boot.shape == (20, 3) and boot.std(0).min() > 0


def test_identical_predictions_give_zero_gains_and_a_fixed_seed_is_deterministic():
    y, dia, probs = _data()
    same = ensemble_gains(y, probs[0], [probs[0]] * 3, probs[0], dia, 7)
    for key in ("gain_vs_vanilla_mean", "gain_vs_vanilla_seed_avg"):
        assert same[key]["ci95"] == [0.0, 0.0] and same[key]["point"] == 0.0 and same[key]["n_boot"] == 1000
    t0 = time.perf_counter()
    a = ensemble_gains(y, probs[0], probs, probs[1], dia, 7)
    assert time.perf_counter() - t0 < 5  # 1000 resamples of ~2500 utterances
    b = ensemble_gains(y, probs[0], probs, probs[1], dia, 7)
    assert a == b
    c = ensemble_gains(y, probs[0], probs, probs[1], dia, 7, seed=1)
    assert c["gain_vs_vanilla_mean"]["ci95"] != a["gain_vs_vanilla_mean"]["ci95"]
    assert c["gain_vs_vanilla_mean"]["point"] == a["gain_vs_vanilla_mean"]["point"]  # the point does not resample
    lo, hi = a["gain_vs_vanilla_seed_avg"]["ci95"]
    assert lo < a["gain_vs_vanilla_seed_avg"]["point"] < hi
