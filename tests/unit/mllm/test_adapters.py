"""Named adapters on one shared base LLM (mer_ray/mllm/adapters.py), with a tiny Gemma-shaped model built
from config: two adapters on different label sets, each answering in its own labels, each equal to
the same directory loaded on its own, and an evicted adapter reloading with identical outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

ROWS = [{"speaker": "Ross", "text": "Oh my God, I can't believe it!"},
        {"speaker": "Rachel", "text": "What are you talking about? Get out of here."},
        {"speaker": "Ross", "text": "Okay, so we're going to the coffee house."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mer_ray.mllm.adapters import install_adapter
    from mer_ray.mllm.tiny import build_tiny_finetuned, build_tiny_lm

    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_lm(root / "base", "gemma3")
    models = root / "models"
    install_adapter(build_tiny_finetuned(base, root / "ft_tv", "meld7", 1), models, "tv")
    install_adapter(build_tiny_finetuned(base, root / "ft_calls", "iemocap4", 2), models, "calls")
    install_adapter(build_tiny_finetuned(base, root / "ft_proj", "meld_sentiment3", 3, lora=False), models, "plain")
    return models


def test_listing_and_names(models, tmp_path):
    from mer_ray.mllm.adapters import install_adapter, list_adapters

    assert list_adapters(models) == {"calls": "iemocap4", "plain": "meld_sentiment3", "tv": "meld7"}
    with pytest.raises(ValueError, match="must match"):
        install_adapter(models / "mllm/adapters/tv", models, "../etc")
    with pytest.raises(FileExistsError, match="already exists"):
        install_adapter(models / "mllm/adapters/tv", models, "tv")
    with pytest.raises(FileNotFoundError, match="mer_mllm.json missing"):
        install_adapter(tmp_path, models, "empty")


def test_each_adapter_answers_in_its_own_labels_and_equals_its_directory_alone(models):
    from mer_ray.mllm.adapters import AdapterHost, UnknownAdapterError
    from mer_ray.mllm.predict import MLLMPredictor

    host = AdapterHost(models)
    tv, calls, plain = host.load("tv"), host.load("calls"), host.load("plain")
    assert (tv.labels, calls.labels) == (["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"],
                                         ["happy", "sad", "neutral", "angry"])
    out = {a.name: a.predict(ROWS) for a in (tv, calls, plain, tv)}  # tv again after the others were active
    assert {k: v.shape for k, v in out.items()} == {"tv": (3, 7), "calls": (3, 4), "plain": (3, 3)}
    for name, p in out.items():
        alone = MLLMPredictor.from_dir(models / "mllm/adapters" / name).predict_dialogue(ROWS)["emotion_probs"]
        np.testing.assert_array_equal(p, np.asarray(alone, np.float64))  # the shared model computes each exactly
        assert np.allclose(p.sum(1), 1.0)
    assert tv.temperature == 1.0 and tv.calibration is None  # uncalibrated until calibration.json exists
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'therapy'; known adapters: \['calls', 'plain', 'tv'\]"):
        host.load("therapy")


def test_an_evicted_adapter_reloads_with_identical_outputs(models):
    from mer_ray.mllm.adapters import AdapterHost

    host = AdapterHost(models)
    tv = host.load("tv")
    first = tv.predict(ROWS)
    name = tv.peft_name
    tv.__del__()  # what Serve's multiplexer does on LRU eviction
    calls = host.load("calls")
    assert name not in host.lm.peft_config  # its weights were freed once another adapter was loaded
    calls.predict(ROWS)
    again = host.load("tv")
    np.testing.assert_array_equal(again.predict(ROWS), first)


def test_an_adapter_calibration_is_its_own(models, tmp_path):
    """A ``calibration.json`` in the adapter directory sets its temperature (distribution ``mllm``)."""
    import shutil

    from mer_ray.mllm.adapters import AdapterHost, install_adapter

    src = tmp_path / "calls_cal"
    shutil.copytree(models / "mllm/adapters/calls", src)
    cal = {"version": 1, "label_set": "iemocap4", "labels": ["happy", "sad", "neutral", "angry"],
           "temperatures": {"mllm": 2.0}, "alpha_range": [0.05, 0.3], "conformal": {}}
    (src / "calibration.json").write_text(json.dumps(cal))
    install_adapter(src, models, "calls-cal")
    host = AdapterHost(models)
    raw, hot = host.load("calls").predict(ROWS), host.load("calls-cal").predict(ROWS)
    assert host.load("calls-cal").temperature == 2.0
    expect = np.exp(np.log(raw) / 2.0)
    np.testing.assert_allclose(hot, expect / expect.sum(1, keepdims=True), rtol=1e-9, atol=1e-12)
    shutil.rmtree(models / "mllm/adapters/calls-cal")
