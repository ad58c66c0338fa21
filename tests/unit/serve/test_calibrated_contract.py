"""The calibrated API contract, in process (no Ray): the ensemble's request logic on the real tiny models.

Two copies of one tiny models dir: one without ``calibration.json`` (answers ``calibrated: false``), one
with a calibration built from the tiny model's own predictions (``tiny_calibration.py``). The text encoder
is the real packaged MiniLM.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from mer_ray.calibration.artifacts import Calibration
from mer_ray.calibration.temperature import apply_temperature
from mer_ray.data.labelmap import project
from mer_ray.serve import schemas as S
from mer_ray.serve.ensemble import AlphaError, Ensemble, label_map
from mer_ray.serve.session_stores import SqliteStore
from mer_ray.serve.sessions import speaker_summary
from tests.integration.serve.test_local_mode import DIALOGUE, MELD7, tiny_models
from tests.unit.serve.tiny_calibration import ALPHA_RANGE, TEMPERATURES, write_calibration

LONGER = DIALOGUE + [{"speaker": "Rachel", "text": "Fine. Whatever."}, {"speaker": "Joey", "text": "How you doin'?"},
                     {"speaker": "Ross", "text": "Can we just talk about this?"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    plain = tiny_models(tmp_path_factory.mktemp("plain"))
    cal = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(plain, cal, dirs_exist_ok=True)
    write_calibration(cal)
    return plain, cal


@pytest.fixture(scope="module")
def ens(dirs):
    """``(uncalibrated, calibrated)`` ensembles over the same model weights and one featurizer."""
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import VanillaMember

    plain, cal = dirs
    feat = RequestFeaturizer()
    assert Calibration.load(plain) is None
    return (Ensemble.local(feat, VanillaMember(str(plain))),
            Ensemble.local(feat, VanillaMember(str(cal)), calibration=Calibration.load(cal)))


def ask(e: Ensemble, utterances=LONGER, label_set=None, alpha=None) -> dict:
    out = asyncio.run(e.recognize(utterances, use_llm=False, label_set=label_set, alpha=alpha))
    return S.RecognizeResponse.model_validate(out).model_dump()  # what the ingress sends


def _arr(out: dict, key: str) -> np.ndarray:
    return np.array([[u[key][lab] for lab in out["labels"]] for u in out["utterances"]])


def test_a_dir_without_calibration_answers_uncalibrated(ens):
    for label_set in (None, "meld_sentiment3"):
        out = ask(ens[0], label_set=label_set, alpha=0.2)  # an alpha is accepted and ignored: nothing to make sets with
        assert out["calibrated"] is False and out["alpha"] is None and out["conformal"] is None
        for u in out["utterances"]:
            assert u["prediction_set"] is None and u["probs"] == u["probs_uncalibrated"]
            assert u["label"] == max(u["probs"], key=u["probs"].get)
    assert all(u["probs"] == u["vanilla"] for u in ask(ens[0])["utterances"])  # use_llm false: the vanilla model


def test_calibrated_probs_are_the_temperature_scaled_distribution_with_the_same_argmax(ens):
    plain, out = ask(ens[0]), ask(ens[1])
    assert out["calibrated"] is True and out["label_set"] == "meld7" and out["labels"] == MELD7
    raw = _arr(out, "probs_uncalibrated")
    np.testing.assert_array_equal(raw, _arr(plain, "probs"))  # the same model: probs_uncalibrated is the old probs
    probs = _arr(out, "probs")
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(probs, apply_temperature(raw, TEMPERATURES["final_no_llm"]), atol=1e-12)
    assert (probs.argmax(1) == raw.argmax(1)).all()
    assert [u["label"] for u in out["utterances"]] == [u["label"] for u in plain["utterances"]]
    assert np.abs(probs - raw).max() > 1e-3  # T = 0.5 moved them
    # each member has its own temperature: vanilla is softened where probs are sharpened
    np.testing.assert_allclose(_arr(out, "vanilla"), apply_temperature(raw, TEMPERATURES["vanilla"]), atol=1e-12)
    assert all(u["llm"] is None and u["mllm"] is None for u in out["utterances"])


def test_prediction_sets_are_ordered_non_empty_and_hold_the_label(ens):
    out = ask(ens[1])
    assert out["alpha"] == 0.1 and out["conformal"] == {"method": "class_conditional_lac", "alpha_range": ALPHA_RANGE}
    sizes = set()
    for u in out["utterances"]:
        s = u["prediction_set"]
        assert s and s[0] == u["label"] and len(set(s)) == len(s) and set(s) <= set(MELD7)
        assert [u["probs"][lab] for lab in s] == sorted((u["probs"][lab] for lab in s), reverse=True)
        sizes.add(len(s))
    assert max(sizes) > 1  # sets, not just the argmax


def test_a_smaller_alpha_never_gives_a_smaller_set(ens):
    lo, hi = ALPHA_RANGE
    alphas = [lo, 0.1, 0.2, 0.3, hi]
    sets = [[set(u["prediction_set"]) for u in ask(ens[1], alpha=a)["utterances"]] for a in alphas]
    for smaller, larger in zip(sets, sets[1:]):  # alphas ascending: sets shrink or stay
        assert all(a >= b for a, b in zip(smaller, larger))
    assert sum(map(len, sets[0])) > sum(map(len, sets[-1]))  # and alpha matters
    assert [ask(ens[1], alpha=a)["alpha"] for a in (lo, hi)] == [lo, hi]


def test_alpha_outside_the_calibrations_range_is_refused_naming_the_range(ens):
    lo, hi = ALPHA_RANGE
    for bad in (0.9, 0.01):
        with pytest.raises(AlphaError, match=rf"alpha {bad} is outside the range this calibration supports: \[{lo}, {hi}\]"):
            ens[1].resolve_alpha(bad)
        with pytest.raises(AlphaError):
            ask(ens[1], alpha=bad)
    for bad in (0, 1, 1.5, -0.1):  # not a miscoverage at all: refused by the schema (a 422 naming alpha)
        with pytest.raises(ValidationError, match="alpha"):
            S.RecognizeRequest.model_validate({"utterances": DIALOGUE, "alpha": bad})
        with pytest.raises(ValidationError, match="alpha"):
            S.TurnRequest.model_validate({"utterance": DIALOGUE[0], "alpha": bad})


def test_another_label_set_is_calibrated_before_the_projection(ens):
    base = ask(ens[1])
    out = ask(ens[1], label_set="meld_sentiment3")
    assert out["labels"] == ["neutral", "positive", "negative"] and out["calibrated"] and out["alpha"] == 0.1
    proj = label_map("meld7", "meld_sentiment3")[2]
    raw7 = _arr(base, "probs_uncalibrated")
    np.testing.assert_allclose(_arr(out, "probs_uncalibrated"), project(raw7, proj), atol=1e-12)
    np.testing.assert_allclose(_arr(out, "probs"), project(apply_temperature(raw7, TEMPERATURES["final_no_llm"]), proj), atol=1e-12)
    for u in out["utterances"]:
        assert abs(sum(u["probs"].values()) - 1) < 1e-12
        assert u["label"] == max(u["probs"], key=u["probs"].get) == max(u["probs_uncalibrated"], key=u["probs_uncalibrated"].get)
        assert u["prediction_set"][0] == u["label"] and set(u["prediction_set"]) <= set(out["labels"])


def test_a_label_set_without_conformal_scores_gets_calibrated_probs_but_no_sets(ens):
    out = ask(ens[1], label_set="iemocap4")
    assert out["calibrated"] is True and out["alpha"] is None and out["conformal"] is None
    assert all(u["prediction_set"] is None and u["probs"] != u["probs_uncalibrated"] for u in out["utterances"])


def test_the_answer_has_exactly_the_contract_fields(ens):
    out = ask(ens[1])
    assert set(out) == {"label_set", "labels", "utterances", "model", "calibrated", "alpha", "conformal", "timing_ms"}
    assert out["model"] is None  # the ensemble answered (an adapter's answer names it)
    assert set(out["utterances"][0]) == {"label", "probs", "probs_uncalibrated", "prediction_set", "vanilla", "llm",
                                         "receptive_fields", "mllm"}
    json.dumps(out)  # plain JSON: no numpy scalars


def test_openapi_documents_every_field_of_the_contract():
    from mer_ray.serve.ingress import api

    spec = api.openapi()
    comps = spec["components"]["schemas"]
    assert {"probs", "probs_uncalibrated", "prediction_set"} <= set(comps["UtterancePrediction"]["properties"])
    assert {"calibrated", "alpha", "conformal"} <= set(comps["RecognizeResponse"]["properties"])
    assert {"calibrated", "alpha", "conformal", "speakers"} <= set(comps["TurnResponse"]["properties"])
    assert set(comps["ConformalInfo"]["properties"]) == {"method", "alpha_range"}
    assert set(comps["SpeakerSummary"]["properties"]) == {"turns", "labels", "mean_probs"}
    alpha = comps["RecognizeRequest"]["properties"]["alpha"]
    assert "alpha_range" in alpha["description"] and {"exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0}.items() <= next(
        a for a in alpha["anyOf"] if a.get("type") == "number").items()
    ours = [m.__name__ for m in (S.Utterance, S.RecognizeRequest, S.BatchRequest, S.TurnRequest, S.UtterancePrediction,
                                 S.ConformalInfo, S.RecognizeResponse, S.BatchResponse, S.SpeakerSummary, S.TurnResponse,
                                 S.LabelsResponse)]
    undocumented = [f"{m}.{p}" for m in ours for p, v in comps[m]["properties"].items() if not v.get("description")]
    assert undocumented == []


def _pred(turn: int, label: str, p: float, label_set: str = "meld_sentiment3") -> dict:
    labels = ["neutral", "positive", "negative"]
    return {"turn": turn, "label_set": label_set, "label": label,
            "probs": {lab: (p if lab == label else (1 - p) / 2) for lab in labels}}


def test_speaker_summary_covers_each_speakers_last_five_turns_in_the_answers_label_set():
    seq = ["A", "B", "A", "A", "A", "A", "B", "A", "A", "A"]  # A speaks 8 times
    turns = [{"speaker": s, "text": str(i), "prediction": _pred(i, "positive" if i % 2 else "negative", 0.6)} for i, s in enumerate(seq)]
    turns[0] = {"speaker": "A", "text": "old"}  # written before predictions were kept: skipped
    turns[3]["prediction"] = _pred(3, "joy", 0.9, label_set="meld7")  # another label set: its labels cannot be averaged
    out = speaker_summary(turns, "meld_sentiment3")
    assert list(out) == ["B", "A"]  # by first appearance
    assert out["B"] == {"turns": [1, 6], "labels": ["positive", "negative"],
                        "mean_probs": {"neutral": pytest.approx(0.2), "positive": pytest.approx(0.4), "negative": pytest.approx(0.4)}}
    assert out["A"]["turns"] == [4, 5, 7, 8, 9]  # the last 5 of 2, 4, 5, 7, 8, 9
    assert out["A"]["labels"] == ["negative", "positive", "positive", "negative", "positive"]
    assert out["A"]["mean_probs"]["negative"] == pytest.approx((2 * 0.6 + 3 * 0.2) / 5)
    assert sum(out["A"]["mean_probs"].values()) == pytest.approx(1.0)
    S.SpeakerSummary.model_validate(out["A"])


def test_session_store_keeps_predictions_and_skips_turns_without_one(tmp_path):
    store = SqliteStore(tmp_path / "sessions", max_turns=3)
    store.append("old", {"speaker": "A", "text": "hi", "text_embedding": [0.0]})  # never answered (its replica died)
    turn, kept, _ = store.append("old", {"speaker": "B", "text": "there"})
    assert turn == 1 and store.annotate("old", turn, _pred(turn, "positive", 0.7))
    assert speaker_summary(store.get("old")["turns"], "meld_sentiment3") == {
        "B": {"turns": [1], "labels": ["positive"], "mean_probs": _pred(1, "positive", 0.7)["probs"]}}
    reloaded = SqliteStore(tmp_path / "sessions", max_turns=3)  # another replica, or this one restarted
    assert reloaded.get("old")["turns"][-1]["prediction"]["label"] == "positive"
    for _ in range(3):
        reloaded.append("old", {"speaker": "A", "text": "more"})
    assert not reloaded.annotate("old", 1, _pred(1, "negative", 0.7))  # turn 1 dropped out of max_turns
    assert not reloaded.annotate("nope", 0, _pred(0, "negative", 0.7))
