"""The ``Adapters`` deployment on a real local Ray: two tiny Gemma-shaped adapters on different label sets behind
one deployment, routed by Serve's multiplexed model id, each answering in its own labels, and one evicted (LRU,
one adapter per replica) reloading with identical outputs."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROWS = [{"speaker": "Ross", "text": "Oh my God, I can't believe it!"},
        {"speaker": "Rachel", "text": "What are you talking about? Get out of here."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mer_ray.mllm.adapters import install_adapter
    from mer_ray.mllm.tiny import build_tiny_finetuned, build_tiny_lm

    root = tmp_path_factory.mktemp("served_adapters")
    base = build_tiny_lm(root / "base", "gemma3")
    install_adapter(build_tiny_finetuned(base, root / "ft_tv", "meld7", 1), root / "models", "tv")
    install_adapter(build_tiny_finetuned(base, root / "ft_calls", "iemocap4", 2), root / "models", "calls")
    return root / "models"


def test_choose_adapter_rules():
    from mer_ray.serve.multiplexed import AdapterChoiceError, choose_adapter

    known = {"calls": "iemocap4", "tv": "meld7"}
    assert choose_adapter(None, None, known) is None
    assert choose_adapter("tv", None, known) == choose_adapter(None, "tv", known) == choose_adapter("tv", "tv", known) == "tv"
    with pytest.raises(AdapterChoiceError, match="header names adapter 'tv' but the body's model field names 'calls'"):
        choose_adapter("tv", "calls", known)
    with pytest.raises(AdapterChoiceError, match=r"unknown adapter 'therapy'; known adapters: \['calls', 'tv'\]"):
        choose_adapter(None, "therapy", known)


def test_multiplexed_adapters_answer_in_their_labels_and_reload_identically(ray_local, models):
    from ray import serve

    from mer_ray.mllm.adapters import AdapterHost
    from mer_ray.serve.multiplexed import adapters_deployment

    alone = {n: AdapterHost(models).load(n).predict(ROWS, calibrated=False) for n in ("tv", "calls")}
    h = serve.run(adapters_deployment(max_num_models_per_replica=1).options(ray_actor_options={"num_cpus": 0.5}).bind(str(models)),
                  name="adapters_test", route_prefix=None)
    try:
        def ask(name):
            return h.options(multiplexed_model_id=name).predict.remote(ROWS).result(timeout_s=300)

        tv = ask("tv")
        assert (tv["adapter"], tv["label_set"], len(tv["labels"])) == ("tv", "meld7", 7)
        calls = ask("calls")  # evicts tv: one adapter per replica
        assert (calls["label_set"], calls["labels"]) == ("iemocap4", ["happy", "sad", "neutral", "angry"])
        assert h.loaded.remote().result() == ["calls"]
        again = ask("tv")
        np.testing.assert_array_equal(again["probs"], tv["probs"])  # reloaded after eviction: identical
        for name, out in (("tv", tv), ("calls", calls)):
            np.testing.assert_array_equal(out["probs"], alone[name])  # served == loaded outside Serve
        with pytest.raises(Exception, match="unknown adapter 'therapy'"):
            ask("therapy")
    finally:
        serve.shutdown()  # the session's Ray stays up for later modules; Serve goes, so the next serve.start applies its options
