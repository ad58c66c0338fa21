"""LanternRefiner and FusionPredictor on one dialogue, without Ray (what Serve wraps)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mer_ray.lantern.predict import FusionPredictor, LanternRefiner

pytestmark = pytest.mark.slow
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def test_refiner_covers_every_utterance_and_fusion_falls_back(tmp_path):
    ref = LanternRefiner.from_config({"kind": "llama_cpp", "model": "smollm2-135m-instruct", "n_threads": 1},
                                     labels=LABELS, sizes=(2, None), stride=1)
    utts = [{"speaker": "Ross", "text": "We were on a break!"}, {"speaker": "Rachel", "text": "Unbelievable."},
            {"speaker": "Joey", "text": "Pizza?"}]
    van = {"emotion_probs": np.random.default_rng(0).dirichlet(np.ones(7), 3)}
    refined = ref.refine(utts, van)
    # fields of size 2: [0,2), [1,3); whole [0,3): positions 0 and 2 have 2 fields, position 1 has 3
    assert [len(r) for r in refined] == [2, 3, 2]
    for r in refined:
        for c in r:
            # float64 softmax rounded to float32 and summed in float32: within ~14 * 2**-25 < 1e-6 of 1
            assert c["error"] is None and c["probs"].shape == (7,) and abs(c["probs"].sum() - 1) < 1e-5
    cf = ref.content_free()
    assert cf.shape == (7,) and abs(cf.sum() - 1) < 1e-6  # float64 softmax: within ~20 * 2**-53 of 1
    (tmp_path / "fusion.json").write_text(json.dumps({"labels": LABELS, "mode": "vanilla", "setting": {}}))
    fused = FusionPredictor.from_dir(tmp_path).fuse(van["emotion_probs"], refined)
    # vanilla mode returns the input as float32: exactly its float32 rounding
    np.testing.assert_array_equal(fused, van["emotion_probs"].astype(np.float32))
    with pytest.raises(ValueError, match="expected"):
        ref.refine(utts, {"emotion_probs": np.ones((2, 7)) / 7})
