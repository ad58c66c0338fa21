"""Ray Train workers SIGKILLed mid-epoch (between 20% and 80% of the steps): the run restarts from its
last checkpoint (``FailureConfig``), finishes, and ends where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300, method="thread")]


def test_vanilla_worker_killed_mid_epoch_resumes_to_the_same_model(cluster, tmp_path):
    from mer_ray.bench.chaos import run_vanilla_scenario

    rec = run_vanilla_scenario(tmp_path)
    print(json.dumps(rec))
    inj = rec["injected"]
    assert inj, "the training worker was never killed mid-epoch"
    assert 0.2 <= inj["progress"] <= 0.8
    assert rec["resumed_epochs"] and min(rec["resumed_epochs"]) >= 1  # resumed from a checkpoint, not from scratch
    assert rec["expected"] == rec["observed"] and rec["lost"] == 0 and rec["duplicated"] == 0  # every epoch once
    # deterministic training (weights, optimiser, scheduler restored; per-epoch seeds): exactly equal
    assert rec["metrics_equal"], rec["metric_diff"]
    assert rec["weights_equal"]
