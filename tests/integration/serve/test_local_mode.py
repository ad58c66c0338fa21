"""The Serve application in process (``serve.run(..., _local_testing_mode=True)``).

The models are tiny, built from configs with a fixed seed (no training); the
text encoder is the real packaged MiniLM and the media stages are the real
extract stages on clips written by the test.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from mer_ray.data.labels import MAPPINGS, get_label_set

MELD7 = list(get_label_set("meld7").labels)
DIALOGUE = [{"speaker": "Ross", "text": "We were on a break!"}, {"speaker": "Rachel", "text": "I can't believe you said that."},
            {"speaker": "Ross", "text": "Okay, okay, I'm sorry."}]


def tiny_models(root: Path, seed: int = 0) -> Path:
    """A models dir with a tiny vanilla model (frozen MiniLM, eGeMAPS and face features, 16 hidden) built from its
    config, with feature-scaling statistics on the features' real scales (eGeMAPS medians up to 2,700)."""
    import torch

    from mer_ray.vanilla.model import VanillaConfig, build_vanilla

    d = root / "vanilla"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = VanillaConfig(encoder="frozen", modalities=["text_embedding", "audio_egemaps", "face_embedding"], hidden=16,
                        n_emotions=7, n_sentiments=3)
    model = build_vanilla(cfg, pretrained=False)
    scaling = {"text_embedding": {"center": [0.0] * 384, "scale": [0.05] * 384, "clip": 5.0},
               "audio_egemaps": {"center": np.linspace(0, 2700, 88).tolist(), "scale": np.logspace(-2, 2.2, 88).tolist(), "clip": 5.0},
               "face_embedding": {"center": [0.2] * 128, "scale": [0.5] * 128, "clip": 5.0}}
    model.set_scaling(scaling)
    torch.save(model.state_dict(), d / "model.pt")
    meta = {"model": cfg.model_dump(), "emotion_labels": MELD7, "sentiment_labels": ["neutral", "positive", "negative"],
            "has_vad": True, "seed": seed, "feature_scaling": {m: model.scalers[m].stats() for m in cfg.modalities}}
    (d / "vanilla.json").write_text(json.dumps(meta))
    return root


def tiny_fusion(root: Path, seed: int = 0, sizes=("2", "whole")) -> Path:
    """A ``fusion/`` dir: the Lantern fusion module built from its config with a fixed seed (not fitted)."""
    import torch

    from mer_ray.lantern.model import FusionConfig, build_fusion

    d = root / "fusion"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_fusion(FusionConfig(n_classes=len(MELD7), hidden=16)).state_dict(), d / "fusion.pt")
    meta = {"labels": MELD7, "mode": "fusion", "selected": "test", "setting": {"hidden": 16}, "calibrated": False,
            "content_free": None, "sizes": list(sizes), "stride": 1, "backend": {"model": "smollm2-135m-instruct"}}
    (d / "fusion.json").write_text(json.dumps(meta))
    return root


def has_lantern() -> bool:
    import importlib.util

    return importlib.util.find_spec("mer_ray.lantern.predict") is not None


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tiny_models(tmp_path_factory.mktemp("models"))
    return tiny_fusion(root) if has_lantern() else root


KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def handle(models):
    import os

    from ray import serve

    from mer_ray.serve.builder import build_app

    os.environ["MER_TEST_KEY"] = "s3cret"  # the replica reads the key from its environment
    # One app for the module (a second local-testing app in one process fails to pickle its FastAPI app).
    # No KV cache carried across requests: each request's llama.cpp token batches are then those of a fresh
    # RefinerMember, so served LLM outputs can be compared bit for bit with the stages called without Ray
    # (llama.cpp logits depend on batch shapes; cross-request reuse is tested in test_llm_llamacpp.py).
    h = serve.run(build_app({"models_dir": str(models), "llm": {"enabled": has_lantern(), "reuse_prefix_across_requests": False},
                             "max_text_chars": 50,
                             "max_body_bytes": 200_000, "max_media_bytes": 100_000, "api_key_env": "MER_TEST_KEY"}),
                  _local_testing_mode=True)
    return h  # local testing mode runs in this process; serve.shutdown() would start a Ray instance


def call(handle, route="recognize", payload=None, raw: bytes | None = None, headers=None, sid=None):
    headers = KEY if headers is None else headers
    return handle.call.remote(route, raw if raw is not None else json.dumps(payload).encode(), headers, sid).result()


def test_recognize_returns_distributions_per_utterance(handle):
    status, out = call(handle, payload={"utterances": DIALOGUE, "use_llm": False})
    assert status == 200, out
    assert out["label_set"] == "meld7" and out["labels"] == MELD7
    assert len(out["utterances"]) == 3
    # a models dir without calibration.json: uncalibrated, no prediction sets
    assert out["calibrated"] is False and out["alpha"] is None and out["conformal"] is None
    for u in out["utterances"]:
        assert set(u) == {"label", "probs", "probs_uncalibrated", "prediction_set", "vanilla", "llm", "receptive_fields", "mllm"}
        assert u["prediction_set"] is None and u["probs"] == u["probs_uncalibrated"]
        # float32 softmax over 7 classes (each p within a few ulp), summed in float64: |sum - 1| < 1e-6
        assert list(u["probs"]) == MELD7 and abs(sum(u["probs"].values()) - 1) < 1e-4
        assert u["label"] == max(u["probs"], key=u["probs"].get)
        assert u["llm"] is None and u["receptive_fields"] == [] and u["probs"] == u["vanilla"]
    assert {"features", "vanilla", "total"} <= set(out["timing_ms"])


def test_prediction_matches_the_predictor_called_without_ray(handle, models):
    from mer_ray.features.text import TextStage
    from mer_ray.vanilla.predict import VanillaPredictor

    emb = TextStage().encode([u["text"] for u in DIALOGUE])
    rows = [{**u, "turn": i, "text_embedding": emb[i].tolist()} for i, u in enumerate(DIALOGUE)]
    want = VanillaPredictor.from_dir(models / "vanilla").predict_dialogue(rows)["emotion_probs"]
    _, out = call(handle, payload={"utterances": DIALOGUE, "use_llm": False})
    got = np.array([[u["probs"][k] for k in MELD7] for u in out["utterances"]])
    # the same three texts in one MiniLM batch, the same rows and model, floats passed through unchanged
    np.testing.assert_array_equal(got, want)


def test_other_label_set_sums_mass_through_the_written_mapping(handle):
    _, base = call(handle, payload={"utterances": DIALOGUE, "use_llm": False})
    status, out = call(handle, payload={"utterances": DIALOGUE, "use_llm": False, "label_set": "iemocap4"})
    assert status == 200 and out["labels"] == ["happy", "sad", "neutral", "angry"]
    mapping = MAPPINGS[("meld7", "iemocap4")]
    for b, u in zip(base["utterances"], out["utterances"]):
        want = {k: sum(p for lab, p in b["probs"].items() if mapping[lab] == k) for k in out["labels"]}
        total = sum(want.values())
        for k in out["labels"]:  # float64 sums of <= 7 probabilities in another order: within ~1e-15
            assert u["probs"][k] == pytest.approx(want[k] / total, abs=1e-6)


def test_batch_answers_each_dialogue_with_its_options(handle):
    status, out = call(handle, "batch", {"dialogues": [{"utterances": DIALOGUE, "use_llm": False},
                                                       {"utterances": DIALOGUE[:1], "label_set": "meld_sentiment3"}]})
    assert status == 200
    assert [len(r["utterances"]) for r in out["results"]] == [3, 1]
    assert out["results"][1]["labels"] == ["neutral", "positive", "negative"]


@pytest.mark.parametrize("raw, status, words", [
    (b'{"utterances": [{"speaker": "A", "text": "hi"}', 422, ["malformed JSON"]),
    (body(utterances=[{"speaker": "A"}]), 422, ["utterances.0.text", "Field required"]),
    (body(), 422, ["utterances", "Field required"]),
    (body(utterances=[]), 422, ["utterances", "at least 1"]),
    (body(utterances=[{"speaker": "A", "text": "x" * 51}]), 422, ["utterances[0].text", "51 characters", "limit of 50"]),
    (body(utterances=[{"speaker": "A", "text": "hi"}], label_set="klingon9"), 422, ["unknown label set 'klingon9'"]),
    (body(utterances=[{"speaker": "A", "text": "hi"}], label_set="iemocap6"), 422, ["no written-down mapping"]),
    (body(utterances=[{"speaker": "A", "text": "hi", "video_b64": "/etc/passwd"}]), 422, ["video_b64", "looks like a file path"]),
    (body(utterances=[{"speaker": "A", "text": "hi", "audio_b64": "file:///etc/shadow"}]), 422, ["audio_b64", "file path"]),
    (body(utterances=[{"speaker": "A", "text": "hi", "video": "clip.mp4"}]), 422, ["utterances.0.video", "never as a path"]),
    (body(utterances=[{"speaker": "A", "text": "hi"}], temperature=0.7), 422, ["temperature", "Extra inputs"]),
    (body(utterances=[{"speaker": "A", "text": "hi", "video_b64": "not base64!"}]), 422, ["video_b64", "not valid base64"]),
    (body(utterances=[{"speaker": "A", "text": "hi", "video_b64": base64.b64encode(b"\0" * 120_000).decode()}]), 413,
     ["utterances[0].video_b64", "limit of 100000"]),
    (b"x" * 200_001, 413, ["over the limit of 200000 bytes"]),
])
def test_bad_input_is_refused_with_a_message_naming_it(handle, raw, status, words):
    got, out = call(handle, raw=raw)
    assert got == status, out
    for w in words:
        assert w in out["error"], (w, out["error"])
    assert call(handle, payload={"utterances": DIALOGUE[:1], "use_llm": False})[0] == 200  # still serving


def test_undecodable_media_is_a_422_naming_the_utterance(handle):
    junk = base64.b64encode(b"this is not a video container at all" * 10).decode()
    status, out = call(handle, payload={"utterances": [DIALOGUE[0], {"speaker": "A", "text": "hi", "video_b64": junk}], "use_llm": False})
    assert status == 422 and "utterances[1]" in out["error"] and "could not be decoded" in out["error"]


def test_media_sent_as_content_reaches_the_face_and_voice_stages(handle, tmp_path):
    from mer_ray.demo.media import clip
    from mer_ray.serve.featurize import RequestFeaturizer

    data = clip(tmp_path / "c.mp4", seconds=1.0, fps=8).read_bytes()
    rows = RequestFeaturizer().featurize([{"speaker": "A", "text": "hello", "video_b64": base64.b64encode(data).decode()},
                                        {"speaker": "B", "text": "text only"}])
    assert len(rows[0]["text_embedding"]) == 384 and len(rows[0]["audio_egemaps"]) == 88
    assert rows[0]["face_embedding"] is not None and len(rows[0]["face_embedding"]) == 128
    assert "face_embedding" not in rows[1] or rows[1]["face_embedding"] is None
    status, out = call(handle, payload={"utterances": [{"speaker": "A", "text": "hello", "video_b64": base64.b64encode(data).decode()}],
                                        "use_llm": False})
    assert status == 200 and len(out["utterances"]) == 1


def test_served_media_features_are_scaled_as_the_predictor_scales_them(handle, models, tmp_path):
    """Serve and ``VanillaPredictor`` (as ``mer predict`` loads it) apply the stored statistics identically,
    and those statistics matter: a present eGeMAPS vector moves the answer."""
    from mer_ray.demo.media import clip
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.vanilla.predict import VanillaPredictor

    b64 = base64.b64encode(clip(tmp_path / "c.mp4", seconds=1.0, fps=8, f0=210.0).read_bytes()).decode()
    utts = [{"speaker": "A", "text": "hello there", "video_b64": b64}, {"speaker": "B", "text": "no media here"}]
    rows = RequestFeaturizer().featurize(utts)
    assert rows[0]["audio_egemaps"] is not None and rows[1].get("audio_egemaps") is None
    pred = VanillaPredictor.from_dir(models / "vanilla")
    st = pred.model.scalers["audio_egemaps"]
    assert float(st.center[-1]) == 2700.0  # the stored statistics were loaded, not the identity
    want = pred.predict_dialogue([{**r, "turn": i} for i, r in enumerate(rows)])["emotion_probs"]
    status, out = call(handle, payload={"utterances": utts, "use_llm": False})
    assert status == 200, out
    got = np.array([[u["probs"][k] for k in MELD7] for u in out["utterances"]])
    np.testing.assert_array_equal(got, want)  # the same features, model and batch: the same floats
    no_audio = pred.predict_dialogue([{**r, "turn": i, "audio_egemaps": None} for i, r in enumerate(rows)])["emotion_probs"]
    assert np.abs(no_audio[0] - want[0]).max() > 1e-4  # the voice features reach the answer


def turn_rows(utterances):
    """Feature rows as a session builds them: each utterance featurized alone, numbered by position."""
    from mer_ray.serve.featurize import RequestFeaturizer

    fs = RequestFeaturizer()
    rows = [fs.featurize([{"speaker": u["speaker"], "text": u["text"], "video_b64": None, "audio_b64": None}])[0]
            for u in utterances]
    for k, r in enumerate(rows):
        r["turn"] = k
    return rows


def test_session_turns_are_idempotent_and_a_closed_session_is_never_restarted(handle):
    sid = "test-session-idem"
    first = [call(handle, "turn", {"utterance": u, "use_llm": False, "expected_turn": i}, sid=sid) for i, u in enumerate(DIALOGUE[:2])]
    assert [(st, out["turn"]) for st, out in first] == [(200, 0), (200, 1)]
    # a retried turn 1 (the client never saw the answer): the stored answer, the session still holds 2 turns
    assert call(handle, "turn", {"utterance": DIALOGUE[1], "use_llm": False, "expected_turn": 1}, sid=sid) == first[1]
    assert handle.get_session.remote(sid).result()["n_turns"] == 2
    for k, u in [(1, DIALOGUE[2]), (3, DIALOGUE[2])]:  # turn 1 with another utterance; a turn ahead
        st, out = call(handle, "turn", {"utterance": u, "use_llm": False, "expected_turn": k}, sid=sid)
        assert (st, out["next_turn"]) == (409, 2), out
    assert handle.delete_session.remote(sid).result()["deleted"]
    for k in (None, 0, 2):
        st, out = call(handle, "turn", {"utterance": DIALOGUE[0], "use_llm": False, "expected_turn": k}, sid=sid)
        assert st == 409 and out["next_turn"] == 2 and "fresh id" in out["error"], out


def test_session_turns_use_earlier_turns_as_context(handle, models):
    from mer_ray.vanilla.predict import VanillaPredictor

    sid = "test-session-1"
    got, labels = [], []
    for i, u in enumerate(DIALOGUE):
        status, out = call(handle, "turn", {"utterance": u, "use_llm": False}, sid=sid)
        assert status == 200, out
        assert out["turn"] == i and out["n_context"] == i + 1
        assert out["calibrated"] is False and out["alpha"] is None and out["utterance"]["prediction_set"] is None
        got.append(out["utterance"]["probs"])
        labels.append(out["utterance"]["label"])
    # each speaker's turns so far, with the label each got when it arrived and the mean of their probs
    assert out["speakers"] == {"Ross": {"turns": [0, 2], "labels": [labels[0], labels[2]],
                                        "mean_probs": {k: pytest.approx((got[0][k] + got[2][k]) / 2) for k in MELD7}},
                               "Rachel": {"turns": [1], "labels": [labels[1]], "mean_probs": got[1]}}
    # the last turn, predicted with its context, equals the predictor on the whole dialogue's rows, each
    # featurized when its turn arrived (a MiniLM batch of one, as the session does; a batch of three
    # would run other matrix shapes and round differently)
    want = VanillaPredictor.from_dir(models / "vanilla").predict_dialogue(turn_rows(DIALOGUE))["emotion_probs"][-1]
    assert [got[-1][k] for k in MELD7] == [float(x) for x in want]
    _, alone = call(handle, payload={"utterances": DIALOGUE[-1:], "use_llm": False})
    # context changed it: a modelling difference (~1e-2), far above float32 rounding (~1e-7)
    assert max(abs(got[-1][k] - alone["utterances"][0]["probs"][k]) for k in MELD7) > 1e-4
    info = handle.get_session.remote(sid).result()
    assert info["n_turns"] == 3 and [t["text"] for t in info["turns"]] == [u["text"] for u in DIALOGUE]
    assert call(handle, "turn", {"utterance": DIALOGUE[0]}, sid="bad id!")[0] == 422


def test_openapi_request_schemas_match_the_models():
    from mer_ray.serve import schemas as S
    from mer_ray.serve.ingress import api

    spec = api.openapi()
    assert {"/v1/recognize", "/v1/recognize:batch", "/healthz", "/v1/labels", "/v1/sessions/{session_id}/turns"} <= set(spec["paths"])
    comps = spec["components"]["schemas"]
    assert set(comps["Utterance"]["properties"]) == {"speaker", "text", "video_b64", "audio_b64"}
    assert set(comps["RecognizeRequest"]["properties"]) == {"utterances", "label_set", "use_llm", "alpha", "model"}
    assert comps["RecognizeRequest"]["additionalProperties"] is False
    body_ref = spec["paths"]["/v1/recognize"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.endswith("/RecognizeRequest")
    resp = spec["paths"]["/v1/recognize"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert set(comps[resp.split("/")[-1]]["properties"]) == set(S.RecognizeResponse.model_fields) == {
        "label_set", "labels", "utterances", "model", "calibrated", "alpha", "conformal", "timing_ms"}
    assert set(comps["UtterancePrediction"]["properties"]) >= {"label", "probs", "probs_uncalibrated", "prediction_set", "vanilla",
                                                               "llm", "receptive_fields"}


def test_api_key_is_checked_when_configured(handle):
    payload = {"utterances": DIALOGUE[:1], "use_llm": False}
    status, out = call(handle, payload=payload, headers={})
    assert status == 401 and "Authorization: Bearer" in out["error"]
    assert call(handle, payload=payload, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(handle, payload=payload, headers={"authorization": "Bearer s3cret"})[0] == 200


@pytest.mark.slow  # the real SmolLM2, ~40 s
@pytest.mark.skipif(not has_lantern(), reason="mer_ray.lantern.predict not in this tree yet")
def test_llm_refinement_and_fusion_with_the_packaged_llm(handle, models):
    """The real SmolLM2 GGUF through llama.cpp; receptive fields of sizes 2 and whole over 3 turns.

    Two overlapping requests (Serve runs sync stage methods in a thread pool; llama.cpp must not be
    entered twice at once) must both succeed and agree with the stages called without Ray.
    """
    r1, r2 = (handle.call.remote("recognize", body(utterances=DIALOGUE), KEY, None) for _ in range(2))
    (status, out), (status2, out2) = r1.result(), r2.result()
    assert status == status2 == 200, (out, out2)
    assert {"llm", "fusion"} <= set(out["timing_ms"])
    want = {0: [[0, 1], [0, 2]], 1: [[0, 1], [1, 2], [0, 2]], 2: [[1, 2], [0, 2]]}
    for i, u in enumerate(out["utterances"]):
        # means of float32-rounded float64 softmaxes / a float32 softmax: |sum - 1| < 1e-6 either way
        assert u["llm"] is not None and abs(sum(u["llm"].values()) - 1) < 1e-4
        assert sorted(u["receptive_fields"]) == sorted(want[i])
        assert abs(sum(u["probs"].values()) - 1) < 1e-4
    # the same stages called without Ray give the same answer
    from mer_ray.serve.config import LLMConfig
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import FusionMember, RefinerMember, VanillaMember

    # Identical computations (the served app keeps no KV cache across requests, and each request's
    # prompts are scored in the same order from an empty cache), so the answers are equal bit for bit.
    rows = RequestFeaturizer().featurize(DIALOGUE)
    van = VanillaMember(str(models)).predict(rows)
    refiner = RefinerMember(str(models), LLMConfig(reuse_prefix_across_requests=False).model_dump())
    ref = refiner.refine(rows, van, [0, 1, 2])
    fused = FusionMember(str(models)).fuse(van["emotion_probs"], ref)
    got = np.array([[u["probs"][k] for k in MELD7] for u in out["utterances"]])
    np.testing.assert_array_equal(got, fused)
    np.testing.assert_array_equal([[u["llm"][k] for k in MELD7] for u in out["utterances"]], np.stack(ref["llm"]))
    got2 = np.array([[u["probs"][k] for k in MELD7] for u in out2["utterances"]])
    np.testing.assert_array_equal(got2, fused)
    # streamed: the last turn, with the LLM, equals position 2 of the same stages on the session's rows
    # (each utterance featurized when its turn arrived)
    for i, u in enumerate(DIALOGUE):
        status, t = call(handle, "turn", {"utterance": u, "use_llm": i == 2}, sid="llm-session")
        assert status == 200, t
    assert sorted(t["utterance"]["receptive_fields"]) == sorted(want[2])
    srows = turn_rows(DIALOGUE)
    svan = VanillaMember(str(models)).predict(srows)
    sfused = FusionMember(str(models)).fuse(svan["emotion_probs"], refiner.refine(srows, svan, [2]))
    assert [t["utterance"]["probs"][k] for k in MELD7] == [float(x) for x in sfused[2]]


def test_refiner_prompts_with_the_template_fusion_was_fitted_on(tmp_path):
    """Serving must prompt as the Lantern job did: ``fusion.json``'s template unless one is configured."""
    from mer_ray.serve.config import LLMConfig
    from mer_ray.serve.members import refiner_settings

    root = tiny_fusion(tmp_path)
    assert refiner_settings(str(root), LLMConfig().model_dump())["template"] == "lantern_v2"  # none recorded: default
    meta_path = root / "fusion" / "fusion.json"
    meta = json.loads(meta_path.read_text())
    meta["template"] = "lantern_v1"
    meta_path.write_text(json.dumps(meta))
    assert refiner_settings(str(root), LLMConfig().model_dump())["template"] == "lantern_v1"
    assert refiner_settings(str(root), LLMConfig(template="my.j2").model_dump())["template"] == "my.j2"
