"""Ray Train workers SIGKILLed mid-epoch (between 20% and 80% of the steps): the run restarts from its
last checkpoint (``FailureConfig``), finishes, and ends where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300, method="thread")]


def test_vanilla_worker_killed_mid_epoch_resumes_to_the_same_model(cluster, tmp_path):
    from mer_ray.bench.chaos_train import run_vanilla_scenario

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


# left out of make test (chaos_full, see test_extract_faults.py); CI still kills a fine-tuning rank in
# tests/integration/mllm/test_finetune.py::test_killed_worker_resumes_from_checkpoint_and_finishes
@pytest.mark.chaos_full
@pytest.mark.timeout(600, method="thread")
def test_llm_finetune_rank_killed_mid_run_resumes_to_the_same_model(cluster, tmp_path, meld_dir):
    """The tiny Gemma-3-shaped LM under DeepSpeed ZeRO-3 on 2 Ray Train workers (gloo), rank 0 SIGKILLed mid-run."""
    from mer_ray.bench.chaos_train import run_llm_scenario

    rec = run_llm_scenario(tmp_path, meld_dir)
    print(json.dumps(rec, default=str))
    inj = rec["injected"]
    assert inj and 0.2 <= inj["progress"] <= 0.8, inj
    assert rec["resumed_from"] and rec["resumed_from"] >= 2, rec  # restarted from the step-2 checkpoint, not from step 0
    assert rec["expected"] == rec["observed"] and rec["lost"] == 0 and rec["duplicated"] == 0, rec
    # the restored model, optimiser and data order replay the same steps: the same final model
    assert rec["loss_diff"] == 0.0 and rec["prob_diff"] == 0.0, rec
