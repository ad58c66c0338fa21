"""Named adapters over real HTTP: the whole app (Featurizer, Vanilla, Adapters) on a real local Serve, deployed
once for the module, with two tiny Gemma-shaped adapters on different label sets (``tv``: meld7; ``calls``:
iemocap4, calibrated: temperature 2 and conformal scores). Each request gets its adapter's labels and exactly its adapter's
probabilities; the header and the ``model`` field must agree; an unknown adapter is a 422 listing the known ones;
``:batch`` answers each dialogue with its own adapter; a session keeps its first turn's adapter; ``/v1/labels``
lists them. The LRU eviction and identical reload are ``test_adapters.py``'s (the deployment alone)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.integration.serve.test_local_mode import DIALOGUE, MELD7, tiny_models

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 18443
IEMOCAP4 = ["happy", "sad", "neutral", "angry"]
TEMPERATURE = 2.0
HEADER = "serve_multiplexed_model_id"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mer_ray.mllm.adapters import install_adapter
    from mer_ray.mllm.tiny import build_tiny_finetuned, build_tiny_lm

    root = tmp_path_factory.mktemp("adapters_http")
    models = tiny_models(root / "models")
    base = build_tiny_lm(root / "base", "gemma3")
    install_adapter(build_tiny_finetuned(base, root / "ft_tv", "meld7", 1), models, "tv")
    calls = install_adapter(build_tiny_finetuned(base, root / "ft_calls", "iemocap4", 2), models, "calls")
    _calls_calibration(models).save(calls)
    return models


def _calls_calibration(models):
    """``calls``: temperature 2 and conformal scores in its own label set. The scores are the ``1 - p`` of its own
    calibrated answers on DIALOGUE (12 of them: 3 near 0, 9 near 1), so the sets change with alpha: at 0.05 the
    quantile rank exceeds 12 and every label is kept; at 0.5 it is the 7th smallest, which drops at least 5."""
    from mer_ray.calibration.artifacts import Calibration, ConformalScores
    from mer_ray.calibration.temperature import apply_temperature
    from mer_ray.mllm.adapters import AdapterHost

    p = apply_temperature(AdapterHost(models).load("calls").predict(DIALOGUE, calibrated=False), TEMPERATURE)
    grid = sorted(float(x) for x in 1.0 - p.ravel())
    scores = ConformalScores(labels=IEMOCAP4, all=grid, per_label={lab: grid for lab in IEMOCAP4})
    return Calibration(label_set="iemocap4", labels=IEMOCAP4, temperatures={"mllm": TEMPERATURE}, alpha_range=(0.05, 0.5),
                       alpha_default=0.1, conformal={"mllm": {"iemocap4": scores}})


@pytest.fixture(scope="module")
def calls_cal(models):
    from mer_ray.calibration.artifacts import Calibration
    from mer_ray.mllm.adapters import adapters_root

    return Calibration.load(adapters_root(models) / "calls")


@pytest.fixture(scope="module")
def alone(models):
    """Each adapter's uncalibrated probabilities for DIALOGUE, loaded without Ray or Serve."""
    from mer_ray.mllm.adapters import AdapterHost

    host = AdapterHost(models)
    return {n: host.load(n).predict(DIALOGUE, calibrated=False) for n in ("tv", "calls")}


@pytest.fixture(scope="module")
def url(ray_local, models, tmp_path_factory):
    # the session's Ray (tests/conftest.py); Serve goes at the end, Ray stays for later modules
    from ray import serve

    from mer_ray.config import load
    from mer_ray.serve.config import ServeConfig
    from mer_ray.serve.deploy import deploy

    cfg = load(ServeConfig, {"models_dir": str(models), "llm": {"enabled": False}, "sessions": {"dir": str(tmp_path_factory.mktemp("s"))},
                             "adapters": {"enabled": True, "max_num_models_per_replica": 2}})
    one = {"num_replicas": 1}
    options = {"Ingress": {**one, "ray_actor_options": {"num_cpus": 0.1}}, "Featurizer": {**one, "ray_actor_options": {"num_cpus": 0.5}},
               "Vanilla": {**one, "ray_actor_options": {"num_cpus": 0.25}}, "Adapters": {**one, "ray_actor_options": {"num_cpus": 0.5}}}
    yield deploy(cfg, options, port=PORT, name="adapters_http", timeout_s=300)
    serve.shutdown()


def post(url: str, path: str, payload: dict, **headers) -> httpx.Response:
    return httpx.post(url + path, json=payload, headers=headers, timeout=120)


def probs(out: dict, key: str = "probs") -> np.ndarray:
    return np.asarray([[u[key][lab] for lab in out["labels"]] for u in out["utterances"]])


def test_each_request_is_answered_by_its_adapter_in_its_labels(url, alone, calls_cal):
    from mer_ray.calibration.temperature import apply_temperature

    tv = post(url, "/v1/recognize", {"utterances": DIALOGUE}, **{HEADER: "tv"})
    calls = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "calls"})
    ens = post(url, "/v1/recognize", {"utterances": DIALOGUE, "use_llm": False})
    assert tv.status_code == calls.status_code == ens.status_code == 200, (tv.text, calls.text, ens.text)
    tv, calls, ens = tv.json(), calls.json(), ens.json()
    assert (tv["model"], tv["label_set"], tv["labels"], tv["calibrated"]) == ("tv", "meld7", MELD7, False)
    assert (calls["model"], calls["label_set"], calls["labels"], calls["calibrated"]) == ("calls", "iemocap4", IEMOCAP4, True)
    np.testing.assert_allclose(probs(tv), alone["tv"], atol=1e-6)  # temperature 1.0: the adapter's own distribution
    np.testing.assert_allclose(probs(tv), probs(tv, "probs_uncalibrated"), atol=0)
    np.testing.assert_allclose(probs(calls, "probs_uncalibrated"), alone["calls"], atol=1e-6)
    np.testing.assert_allclose(probs(calls), apply_temperature(probs(calls, "probs_uncalibrated"), TEMPERATURE), atol=1e-12)
    assert all(u["vanilla"] is None for u in tv["utterances"] + calls["utterances"])
    assert all(u["prediction_set"] is None for u in tv["utterances"]) and tv["alpha"] is None  # no conformal scores
    # calls: its own conformal sets on its calibrated probabilities, at the calibration's default alpha
    assert calls["alpha"] == 0.1 and calls["conformal"] == {"method": "class_conditional_lac", "alpha_range": [0.05, 0.5]}
    assert [u["prediction_set"] for u in calls["utterances"]] == calls_cal.prediction_sets("mllm", "iemocap4", probs(calls))
    assert ens["model"] is None and ens["labels"] == MELD7 and all(u["vanilla"] for u in ens["utterances"])  # the ensemble, as before
    same = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "tv"}, **{"serve-multiplexed-model-id": "tv"})
    assert same.status_code == 200 and same.json()["model"] == "tv"  # both given and agreeing; the proxy's hyphen form
    mapped = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "tv", "label_set": "meld_sentiment3"}).json()
    assert mapped["model"] == "tv" and mapped["labels"] == ["neutral", "positive", "negative"]


def test_a_disagreeing_unknown_or_unmappable_choice_is_a_422_that_says_why(url):
    r = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "calls"}, **{HEADER: "tv"})
    assert r.status_code == 422 and "header names adapter 'tv' but the body's model field names 'calls'" in r.json()["error"]
    r = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "therapy"})
    assert r.status_code == 422 and "unknown adapter 'therapy'; known adapters: ['calls', 'tv']" in r.json()["error"]
    r = post(url, "/v1/recognize", {"utterances": DIALOGUE}, **{HEADER: "therapy"})
    assert r.status_code == 422 and "known adapters: ['calls', 'tv']" in r.json()["error"]
    r = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "calls", "label_set": "meld_sentiment3"})
    assert r.status_code == 422 and "adapter 'calls': label_set 'meld_sentiment3' cannot be answered" in r.json()["error"]


def test_batch_answers_each_dialogue_with_its_own_adapter(url):
    items = [{"utterances": DIALOGUE[:2], "model": "tv"}, {"utterances": DIALOGUE, "model": "calls"}, {"utterances": DIALOGUE[:1]}]
    r = post(url, "/v1/recognize:batch", {"dialogues": items})
    assert r.status_code == 200, r.text
    got = [(x["model"], x["labels"], len(x["utterances"])) for x in r.json()["results"]]
    assert got == [("tv", MELD7, 2), ("calls", IEMOCAP4, 3), (None, MELD7, 1)]
    r = post(url, "/v1/recognize:batch", {"dialogues": items[2:]}, **{HEADER: "calls"})  # a header names every dialogue's
    assert r.status_code == 200 and r.json()["results"][0]["model"] == "calls"
    r = post(url, "/v1/recognize:batch", {"dialogues": items}, **{HEADER: "tv"})
    assert r.status_code == 422 and r.json()["error"].startswith("dialogues[1]: the serve_multiplexed_model_id header names adapter 'tv'")


def test_a_session_keeps_the_adapter_of_its_first_turn(url):
    def turn(sid, k, **kw):
        return post(url, f"/v1/sessions/{sid}/turns", {"utterance": DIALOGUE[k], "expected_turn": k, **kw})

    first = turn("with-calls", 0, model="calls")
    assert first.status_code == 200 and (first.json()["model"], first.json()["labels"]) == ("calls", IEMOCAP4)
    second = turn("with-calls", 1)  # naming none: the session's adapter
    assert second.status_code == 200, second.text
    assert (second.json()["model"], second.json()["n_context"], second.json()["labels"]) == ("calls", 2, IEMOCAP4)
    again = turn("with-calls", 1)  # a retry: the stored answer
    assert again.json() == second.json()
    r = turn("with-calls", 2, model="tv")
    assert r.status_code == 422 and "session 'with-calls' is answered by adapter 'calls'" in r.json()["error"]
    assert "this turn asks for adapter 'tv'" in r.json()["error"]
    info = httpx.get(f"{url}/v1/sessions/with-calls").json()
    assert (info["n_turns"], info["model"]) == (2, "calls")  # the refused turn left nothing
    assert turn("ensemble", 0).json()["model"] is None
    r = turn("ensemble", 1, model="tv")
    assert r.status_code == 422 and "answered by the ensemble (no adapter)" in r.json()["error"]


def test_labels_lists_the_adapters(url):
    out = httpx.get(f"{url}/v1/labels").json()
    assert out["adapters"] == {"calls": "iemocap4", "tv": "meld7"} and out["model_label_set"] == "meld7"


def test_an_adapters_prediction_sets_follow_the_requests_alpha_within_its_range(url, calls_cal):
    wide = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "calls", "alpha": 0.05}).json()
    narrow = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "calls", "alpha": 0.5}).json()
    assert (wide["alpha"], narrow["alpha"]) == (0.05, 0.5)
    for a, w, n in zip(probs(wide), wide["utterances"], narrow["utterances"]):
        assert w["prediction_set"] == calls_cal.prediction_sets("mllm", "iemocap4", a[None], 0.05)[0]
        assert set(n["prediction_set"]) <= set(w["prediction_set"])  # a larger alpha never grows a set
    assert all(len(u["prediction_set"]) == 4 for u in wide["utterances"])  # the rank exceeds the 12 scores: all labels
    assert sum(len(u["prediction_set"]) for u in narrow["utterances"]) <= 7
    r = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "calls", "alpha": 0.9})
    assert r.status_code == 422 and "adapter 'calls': alpha 0.9 is outside the range this calibration supports: [0.05, 0.5]" in r.json()["error"]
    tv = post(url, "/v1/recognize", {"utterances": DIALOGUE, "model": "tv", "alpha": 0.9})
    assert tv.status_code == 200 and tv.json()["alpha"] is None  # no conformal scores: alpha does not apply
    turn = post(url, "/v1/sessions/calls-alpha/turns", {"utterance": DIALOGUE[0], "expected_turn": 0, "model": "calls", "alpha": 0.9})
    assert turn.status_code == 422  # refused before the store: the session holds nothing
    assert httpx.get(f"{url}/v1/sessions/calls-alpha").status_code == 404
