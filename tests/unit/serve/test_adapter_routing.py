"""The pure rules of serving named adapters (no Ray): reading the header as Serve's proxy does, refusing a choice,
the answer an adapter gives (its labels, its temperature applied as the ensemble applies one, the label-set
projection), a session's fixed adapter and its turns' keys, and the config that enables it all."""

from __future__ import annotations

import numpy as np
import pytest

from mer_ray.serve.multiplexed import HEADER, AdapterChoiceError, adapter_answer, choose_adapter, header_value

KNOWN = {"calls": "iemocap4", "tv": "meld7"}
IEMOCAP4 = ["happy", "sad", "neutral", "angry"]


def deployment_out(probs, label_set="iemocap4", labels=IEMOCAP4, temperature=1.0, calibrated=False) -> dict:
    """What the ``Adapters`` deployment's ``predict`` returns."""
    return {"adapter": "calls", "label_set": label_set, "labels": labels, "probs": np.asarray(probs, dtype=np.float64),
            "temperature": temperature, "calibrated": calibrated}


P = [[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]


def test_the_header_is_read_as_serves_proxy_reads_it():
    assert header_value(None) is None and header_value({"content-type": "application/json"}) is None
    for key in (HEADER, "Serve_Multiplexed_Model_Id", "serve-multiplexed-model-id"):  # nginx turns _ into -
        assert header_value({key: "tv"}) == "tv"
    assert header_value({HEADER: ""}) is None  # an empty header names nothing


def test_naming_an_adapter_when_none_are_served_is_refused_not_ignored():
    assert choose_adapter(None, None, None) is None  # the ensemble, as without adapters
    for header, body in (("tv", None), (None, "tv")):
        with pytest.raises(AdapterChoiceError, match=r"serves no adapters \(adapters.enabled: false\)"):
            choose_adapter(header, body, None)
    with pytest.raises(AdapterChoiceError, match=r"known adapters: \[\]"):  # enabled, none installed (yet)
        choose_adapter(None, "tv", {})


def test_an_adapter_answers_alone_in_its_own_labels():
    out = adapter_answer(deployment_out(P), None, None, {"adapter": 1.0})
    assert (out["model"], out["label_set"], out["labels"]) == ("calls", "iemocap4", IEMOCAP4)
    assert [u["label"] for u in out["utterances"]] == ["neutral", "happy", "happy"]  # a tie: the first label, as argmax
    for u, p in zip(out["utterances"], P):
        assert u["probs"] == u["probs_uncalibrated"] == dict(zip(IEMOCAP4, p))  # temperature 1.0: left as it is
        assert u["vanilla"] is u["llm"] is u["mllm"] is u["prediction_set"] is None and u["receptive_fields"] == []
    assert (out["calibrated"], out["alpha"], out["conformal"], out["timing_ms"]) == (False, None, None, {"adapter": 1.0})
    from mer_ray.serve.schemas import RecognizeResponse

    assert RecognizeResponse.model_validate(out).model_dump()["model"] == "calls"  # the response contract holds


def test_the_adapters_temperature_is_applied_as_the_ensemble_applies_one():
    from mer_ray.calibration.temperature import apply_temperature

    out = adapter_answer(deployment_out(P, temperature=2.0, calibrated=True), None, [2, 0], {})
    assert out["calibrated"] is True and len(out["utterances"]) == 2  # targets: those rows, in that order
    for u, row in zip(out["utterances"], [2, 0]):
        np.testing.assert_allclose([u["probs"][k] for k in IEMOCAP4], apply_temperature(np.asarray(P[row]), 2.0), atol=1e-15)
        assert [u["probs_uncalibrated"][k] for k in IEMOCAP4] == P[row]
        assert u["label"] == max(u["probs_uncalibrated"], key=u["probs_uncalibrated"].get)  # a temperature keeps the argmax


def test_a_mapped_label_set_is_projected_after_the_temperature_and_another_is_refused():
    from mer_ray.calibration.temperature import apply_temperature
    from mer_ray.data.labelmap import project
    from mer_ray.serve.ensemble import LabelSetError, label_map

    meld7 = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    p = np.array([[0.1, 0.4, 0.2, 0.1, 0.1, 0.05, 0.05]])
    out = adapter_answer(deployment_out(p, "meld7", meld7, temperature=0.5, calibrated=True), "meld_sentiment3", None, {})
    assert out["label_set"] == "meld_sentiment3" and out["labels"] == ["neutral", "positive", "negative"]
    want = project(apply_temperature(p, 0.5), label_map("meld7", "meld_sentiment3")[2])[0]
    np.testing.assert_allclose([out["utterances"][0]["probs"][k] for k in out["labels"]], want, atol=1e-15)
    with pytest.raises(LabelSetError, match="no written-down mapping to 'iemocap6'"):
        adapter_answer(deployment_out(P), "iemocap6", None, {})


def test_a_session_keeps_the_adapter_of_its_first_turn():
    from mer_ray.serve.sessions import AdapterConflict, check_adapter

    check_adapter("s", 0, "tv", None)  # the first turn fixes it
    check_adapter("s", 3, "tv", "tv")
    check_adapter("s", 3, None, None)
    with pytest.raises(AdapterConflict, match="session 's' is answered by adapter 'tv', fixed by its first turn; this turn asks for adapter 'calls'"):
        check_adapter("s", 1, "calls", "tv")
    with pytest.raises(AdapterConflict, match=r"answered by the ensemble \(no adapter\).*asks for adapter 'tv'"):
        check_adapter("s", 1, "tv", None)


def test_a_turns_key_counts_its_adapter_however_named_and_is_unchanged_without_one():
    from mer_ray.serve.sessions import request_key, turn_key

    body = {"utterance": {"speaker": "A", "text": "hi"}, "label_set": None, "use_llm": True, "alpha": None, "expected_turn": 0}
    assert turn_key({**body, "model": None}, None) == request_key(body)  # keys of turns stored before adapters existed
    assert turn_key({**body, "model": "tv"}, "tv") == turn_key({**body, "model": None}, "tv") != turn_key(body, "calls")
    assert turn_key(body, "tv") != request_key(body)


def test_the_adapters_section_refuses_unknown_keys_and_an_empty_adapters_dir_fails_the_build(tmp_path):
    from pydantic import ValidationError

    from mer_ray.serve.builder import MissingModelsError, build_app, require_adapters
    from mer_ray.serve.config import ServeConfig

    assert ServeConfig().adapters.enabled is False and ServeConfig().adapters.max_num_models_per_replica == 3
    with pytest.raises(ValidationError, match="max_models"):
        ServeConfig.model_validate({"adapters": {"enabled": True, "max_models": 2}})
    cfg = ServeConfig(models_dir=str(tmp_path), adapters={"enabled": True})
    for build in (lambda: require_adapters(cfg), lambda: build_app(cfg)):
        with pytest.raises(MissingModelsError) as e:
            build()
        assert f"{tmp_path}/mllm/adapters holds no adapter" in str(e.value)
        assert f"mer finetune --config jobs/finetune_cpu.yaml --adapter-name NAME --models {tmp_path}" in str(e.value)
    require_adapters(ServeConfig(models_dir=str(tmp_path)))  # disabled: nothing is needed


def test_mer_serve_with_adapters_and_none_installed_exits_1_before_ray_starts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mer_ray.serve.deploy as deploy
    from mer_ray.cli import app

    def no_ray(*a, **k):
        raise AssertionError("mer serve started Ray although no adapter is installed")

    monkeypatch.setattr(deploy, "start_local_ray", no_ray)
    (tmp_path / "vanilla").mkdir()
    (tmp_path / "vanilla" / "vanilla.json").write_text("{}")  # only its presence is checked before Ray
    res = CliRunner().invoke(app, ["serve", "--config", "serve/adapters.yaml", "--models", str(tmp_path), "--no-llm", "--exit"])
    assert res.exit_code == 1 and f"{tmp_path}/mllm/adapters holds no adapter" in res.output
    assert "--adapter-name NAME" in res.output


def test_an_adapter_with_conformal_scores_answers_with_its_sets_at_the_requests_alpha():
    from mer_ray.calibration.artifacts import Calibration, ConformalScores
    from mer_ray.calibration.temperature import apply_temperature

    grid = list(np.linspace(0.05, 0.95, 30))
    cal = Calibration(label_set="iemocap4", labels=IEMOCAP4, temperatures={"mllm": 2.0}, alpha_range=(0.05, 0.5),
                      conformal={"mllm": {"iemocap4": ConformalScores(labels=IEMOCAP4, all=grid, per_label={})}}, method="lac")
    rule = {"thresholds": cal.thresholds("mllm", "iemocap4", 0.3).tolist(), "labels": IEMOCAP4, "alpha": 0.3,
            "method": "lac", "alpha_range": [0.05, 0.5]}
    out = adapter_answer({**deployment_out(P, temperature=2.0, calibrated=True), "sets": rule}, None, None, {})
    assert out["alpha"] == 0.3 and out["conformal"] == {"method": "lac", "alpha_range": [0.05, 0.5]}
    want = cal.prediction_sets("mllm", "iemocap4", apply_temperature(np.asarray(P), 2.0), 0.3)  # on the calibrated probs
    assert [u["prediction_set"] for u in out["utterances"]] == want
    assert all(u["label"] == s[0] for u, s in zip(out["utterances"], want))  # a set leads with the argmax
    plain = adapter_answer({**deployment_out(P), "sets": None}, None, None, {})
    assert plain["alpha"] is None and plain["conformal"] is None and all(u["prediction_set"] is None for u in plain["utterances"])
