"""Temperature scaling: argmax kept, a known temperature recovered, cross-fitting out of fold."""

from __future__ import annotations

import numpy as np
import pytest

from mer_ray.calibration.temperature import apply_temperature, crossfit_temperature, fit_temperature, group_folds
from tests.unit.calibration.synth import dialogues, draw, softmax


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 10.0])
def test_temperature_keeps_the_argmax_and_sums_to_one(t):
    z, _, _ = draw(500, seed=1)
    p = softmax(z)
    q = apply_temperature(p, t)
    assert (q.argmax(1) == p.argmax(1)).all()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-12)


@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_a_known_temperature(t):
    # gold drawn from softmax(z / t): the NLL-optimal temperature of softmax(z) is t
    z, y, _ = draw(20_000, t=t, seed=2)
    assert fit_temperature(softmax(z), y) == pytest.approx(t, rel=0.05)


def test_fit_temperature_of_calibrated_data_is_one():
    _, y, p = draw(20_000, t=2.0, seed=3)
    assert fit_temperature(p, y) == pytest.approx(1.0, rel=0.05)


def test_group_folds_keep_dialogues_whole_and_cover_every_row():
    g = dialogues(103, per=4)
    folds = group_folds(g, k=5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(103))
    owner = {}
    for f, idx in enumerate(folds):
        for d in set(g[idx]):
            assert owner.setdefault(d, f) == f  # a dialogue in one fold only
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_folds(np.array(["a"] * 5))


def test_crossfit_scales_each_fold_with_a_temperature_fitted_on_the_others():
    z, y, _ = draw(2_000, t=2.0, seed=4)
    p, g = softmax(z), dialogues(2_000)
    oof, temps = crossfit_temperature(p, y, g, k=4, seed=0, return_temperatures=True)
    assert len(temps) == 4 and all(t == pytest.approx(2.0, rel=0.15) for t in temps)
    for idx, t in zip(group_folds(g, 4, 0), temps):
        rest = np.setdiff1d(np.arange(len(y)), idx)
        assert t == pytest.approx(fit_temperature(p[rest], y[rest]))  # fitted without the fold's rows
        np.testing.assert_allclose(oof[idx], apply_temperature(p[idx], t))
    assert (oof.argmax(1) == p.argmax(1)).all()
