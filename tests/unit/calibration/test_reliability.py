"""ECE, NLL, top-k coverage and the reliability diagram."""

from __future__ import annotations

import numpy as np
import pytest

from mer_ray.calibration.reliability import ece, nll, reliability_bins, reliability_diagram, smallest_topk, topk_coverage
from tests.unit.calibration.synth import draw, softmax


def test_ece_of_calibrated_data_is_small_and_of_overconfident_data_large():
    z, y, p = draw(20_000, t=2.0, seed=0)
    # binned ECE of perfectly calibrated data is sampling noise: ~sqrt(bins / n) scale, well under 0.02 here
    assert ece(p, y) < 0.02
    assert ece(softmax(z), y) > 0.15  # softmax(z) is over-confident by a temperature of 2


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # 15 bins: 0.9 -> bin 13, 0.8 -> bin 11, 0.6 -> bin 8, 0.7 -> bin 10 (upper edges included)
    want = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert ece(probs, y) == pytest.approx(want)
    r = reliability_bins(probs, y)
    assert r["count"].sum() == 4 and r["count"][13] == 1
    assert ece(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_nll_matches_the_definition_and_uses_every_label():
    _, y, p = draw(300, c=5, seed=1)
    assert nll(p, y) == pytest.approx(-np.mean(np.log(p[np.arange(300), y])), rel=1e-9)
    # gold never uses label 4: log_loss must still see all 5 columns
    y2 = np.minimum(y, 3)
    assert nll(p, y2) == pytest.approx(-np.mean(np.log(p[np.arange(300), y2])), rel=1e-9)


def test_topk():
    probs = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    y = np.array([0, 2, 0])
    assert [topk_coverage(probs, y, k) for k in (1, 2, 3)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert smallest_topk(probs, y, 0.6) == 2 and smallest_topk(probs, y, 0.9) == 3


def test_reliability_diagram_writes_a_png(tmp_path):
    z, y, p = draw(2_000, seed=2)
    path = reliability_diagram({"a": (softmax(z), p, y), "b": (p, p, y)}, tmp_path / "sub" / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
