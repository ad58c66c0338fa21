"""End to end on a real local Ray: real HTTP on 127.0.0.1 through httpx.

One Ray instance (``address="local"``, its own temp dir, a non-default port)
serves the app for the whole module: every bad input, sessions that survive a
replica restart and a store restart, and autoscaling of the Featurizer up under
a bounded load and back down after it (delays shortened in this test's options).
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time

import httpx
import pytest

from tests.integration.serve.test_local_mode import DIALOGUE, MELD7, tiny_models, turn_rows
from tests.unit.serve.tiny_calibration import ALPHA_RANGE, write_calibration

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 18431
KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 3,
         "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny models with a calibration.json (the uncalibrated answer is tested in local mode)."""
    root = tiny_models(tmp_path_factory.mktemp("models"))
    write_calibration(root)
    return root


@pytest.fixture(scope="module")
def service(tmp_path_factory, models):
    import ray
    from ray import serve

    from mer_ray.config import load
    from mer_ray.serve.config import ServeConfig
    from mer_ray.serve.deploy import deploy, start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=4, temp_dir=str(tmp_path_factory.mktemp("ray")), env={"MER_HTTP_KEY": KEY})
    cfg = load(ServeConfig, {"models_dir": str(models), "llm": {"enabled": False}, "api_key_env": "MER_HTTP_KEY",
                       "max_text_chars": 100, "max_body_bytes": 300_000, "max_media_bytes": 150_000,
                       "sessions": {"dir": str(tmp_path_factory.mktemp("sessions"))}})
    options = {"Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
               "Featurizer": {"autoscaling_config": SCALE, "max_ongoing_requests": 2, "ray_actor_options": {"num_cpus": 0.5}},
               "Vanilla": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}
    os.environ["MER_HTTP_KEY"] = KEY  # the driver builds the app; replicas get the key from the runtime env
    url = deploy(cfg, options, port=PORT, timeout_s=240)
    yield url
    serve.shutdown()
    ray.shutdown()


def post(url, path, payload=None, content=None, headers=AUTH, **kw):
    return httpx.post(url + path, json=payload if content is None else None, content=content, headers=headers, timeout=60, **kw)


def test_recognize_health_labels_and_openapi_over_http(service):
    r = post(service, "/v1/recognize", {"utterances": DIALOGUE, "use_llm": False})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["labels"] == MELD7 and len(out["utterances"]) == 3
    assert all(abs(sum(u["probs"].values()) - 1) < 1e-4 for u in out["utterances"])  # float32 softmax: < 1e-6
    assert httpx.get(service + "/healthz").json()["status"] == "ok"
    labels = httpx.get(service + "/v1/labels").json()
    assert labels["model_label_set"] == "meld7" and "iemocap4" in labels["available"]
    spec = httpx.get(service + "/openapi.json").json()
    assert "/v1/recognize:batch" in spec["paths"] and "RecognizeRequest" in spec["components"]["schemas"]
    assert httpx.get(service + "/docs").status_code == 200
    r = post(service, "/v1/recognize:batch", {"dialogues": [{"utterances": DIALOGUE[:2], "use_llm": False}] * 2})
    assert r.status_code == 200 and [len(x["utterances"]) for x in r.json()["results"]] == [2, 2]


def _check_answer(out: dict, alpha: float) -> None:
    """The calibrated contract of one /v1/recognize answer (or a turn's, with ``utterances`` of one)."""
    assert out["calibrated"] is True and out["alpha"] == alpha
    assert out["conformal"] == {"method": "class_conditional_lac", "alpha_range": list(ALPHA_RANGE)}
    for u in out["utterances"]:
        assert set(u["probs"]) == set(u["probs_uncalibrated"]) == set(out["labels"])
        assert abs(sum(u["probs"].values()) - 1) < 1e-9 and abs(sum(u["probs_uncalibrated"].values()) - 1) < 1e-4
        assert u["label"] == max(u["probs"], key=u["probs"].get) == max(u["probs_uncalibrated"], key=u["probs_uncalibrated"].get)
        assert u["probs"] != u["probs_uncalibrated"]
        s = u["prediction_set"]
        assert s and s[0] == u["label"] and set(s) <= set(out["labels"])
        assert [u["probs"][k] for k in s] == sorted((u["probs"][k] for k in s), reverse=True)


def test_calibrated_answers_prediction_sets_and_alpha_over_http(service):
    r = post(service, "/v1/recognize", {"utterances": DIALOGUE, "use_llm": False})
    assert r.status_code == 200, r.text
    _check_answer(r.json(), 0.1)  # the calibration's default
    lo, hi = ALPHA_RANGE
    small, large = (post(service, "/v1/recognize", {"utterances": DIALOGUE, "use_llm": False, "alpha": a}).json() for a in (lo, hi))
    _check_answer(small, lo)
    _check_answer(large, hi)
    assert all(set(a["prediction_set"]) >= set(b["prediction_set"]) for a, b in zip(small["utterances"], large["utterances"]))
    r = post(service, "/v1/recognize", {"utterances": DIALOGUE, "use_llm": False, "label_set": "meld_sentiment3", "alpha": 0.2})
    assert r.status_code == 200 and r.json()["labels"] == ["neutral", "positive", "negative"]
    _check_answer(r.json(), 0.2)
    r = post(service, "/v1/recognize", {"utterances": DIALOGUE, "use_llm": False, "label_set": "iemocap4"})
    out = r.json()  # calibrated, but this calibration has no conformal scores for iemocap4
    assert out["calibrated"] is True and out["alpha"] is None and out["conformal"] is None
    assert all(u["prediction_set"] is None for u in out["utterances"])


@pytest.mark.parametrize("alpha, words", [(0.9, f"alpha 0.9 is outside the range this calibration supports: [{ALPHA_RANGE[0]}, {ALPHA_RANGE[1]}]"),
                                          (0.01, "alpha 0.01 is outside the range"), (1.5, "alpha: Input should be less than 1"),
                                          (0, "alpha: Input should be greater than 0"), ("high", "alpha: Input should be a valid number")])
def test_alpha_outside_the_range_is_a_422_naming_it(service, alpha, words):
    for path, payload in [("/v1/recognize", {"utterances": DIALOGUE[:1], "alpha": alpha}),
                          ("/v1/sessions/e2e-alpha/turns", {"utterance": DIALOGUE[0], "alpha": alpha})]:
        r = post(service, path, payload)
        assert r.status_code == 422 and words in r.json()["error"], r.text
    r = post(service, "/v1/recognize:batch", {"dialogues": [{"utterances": DIALOGUE[:1]}, {"utterances": DIALOGUE[:1], "alpha": alpha}]})
    assert r.status_code == 422 and words in r.json()["error"], r.text
    if isinstance(alpha, float) and 0 < alpha < 1:
        assert r.json()["error"].startswith("dialogues[1]: ")


def test_batch_dialogues_carry_their_own_alpha_and_label_set(service):
    r = post(service, "/v1/recognize:batch", {"dialogues": [{"utterances": DIALOGUE, "use_llm": False, "alpha": 0.05},
                                                            {"utterances": DIALOGUE[:2], "label_set": "meld_sentiment3"}]})
    assert r.status_code == 200, r.text
    a, b = r.json()["results"]
    _check_answer(a, 0.05)
    _check_answer(b, 0.1)
    assert b["labels"] == ["neutral", "positive", "negative"]


def test_session_turns_carry_the_calibration_and_each_speakers_last_five_turns(service):
    speakers = ["Ross", "Ross", "Rachel", "Ross", "Ross", "Ross", "Ross"]
    seen = []
    for i, spk in enumerate(speakers):
        r = post(service, "/v1/sessions/e2e-speakers/turns", {"utterance": {"speaker": spk, "text": f"line {i}, about the break"},
                                                             "use_llm": False, "alpha": 0.2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["turn"] == i
        _check_answer({**out, "utterances": [out["utterance"]]}, 0.2)
        seen.append(out["utterance"])
    ross = [1, 3, 4, 5, 6]  # the last 5 of Ross's 6 turns
    assert set(out["speakers"]) == {"Ross", "Rachel"}
    assert out["speakers"]["Ross"]["turns"] == ross and out["speakers"]["Rachel"]["turns"] == [2]
    assert out["speakers"]["Ross"]["labels"] == [seen[t]["label"] for t in ross]
    for k in MELD7:
        assert out["speakers"]["Ross"]["mean_probs"][k] == pytest.approx(sum(seen[t]["probs"][k] for t in ross) / 5, abs=1e-12)
    assert out["speakers"]["Rachel"]["mean_probs"] == seen[2]["probs"]


_ASSETS = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def _assets_are_served_here(service: str, page: str) -> list[str]:
    r = httpx.get(service + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:200]
    refs = _ASSETS.findall(r.text)
    off = [u for u in refs if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", u, re.I) and not u.startswith(service)]
    assert off == [], f"{page} loads assets from off the server: {off}"
    for u in refs:
        got = httpx.get(str(httpx.URL(service + page).join(u)))
        assert got.status_code == 200 and got.content, (page, u, got.status_code)
    return refs


def test_docs_load_no_asset_from_a_cdn(service):
    refs = _assets_are_served_here(service, "/docs")
    assert any(u.endswith("swagger-ui-bundle.js") for u in refs) and any(u.endswith(".css") for u in refs)
    assert "validatorUrl" in httpx.get(service + "/docs").text  # Swagger UI's online validator is off
    assert any(u.endswith("redoc.standalone.js") for u in _assets_are_served_here(service, "/redoc"))


def test_the_page_and_its_static_files_are_served(service):
    _assets_are_served_here(service, "/")
    r = httpx.get(service + "/static/index.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for bad in ("/static/nope.js", "/static/.hidden", "/static/%2E%2E", "/static/..%2Fpage.py", "/static/..%2F..%2Fpyproject.toml"):
        r = httpx.get(service + bad)
        assert r.status_code == 404, (bad, r.status_code, r.text[:200])
    assert "no static file 'nope.js'" in httpx.get(service + "/static/nope.js").json()["error"]


def _chunks(n: int):
    for _ in range(n // 10_000 + 1):
        yield b" " * 10_000


BAD = [
    ("malformed JSON", dict(content=b'{"utterances": [{"speaker": "A", "text": "hi"},'), 422, "malformed JSON"),
    ("missing field", dict(payload={"utterances": [{"text": "hi"}]}), 422, "utterances.0.speaker: Field required"),
    ("empty dialogue", dict(payload={"utterances": []}), 422, "at least 1 item"),
    ("text too long", dict(payload={"utterances": [{"speaker": "A", "text": "y" * 101}]}), 422, "utterances[0].text: 101 characters"),
    ("oversized body", dict(content=b"{" + b" " * 300_001 + b"}"), 413, "over the limit of 300000 bytes"),
    ("oversized body, chunked", dict(content=_chunks(400_000)), 413, "over the limit of 300000 bytes"),
    ("oversized upload", dict(payload={"utterances": [{"speaker": "A", "text": "hi", "audio_b64": base64.b64encode(b"\1" * 160_000).decode()}]}),
     413, "audio_b64: upload of 160000 bytes"),
    ("unknown label set", dict(payload={"utterances": [{"speaker": "A", "text": "hi"}], "label_set": "nope"}), 422, "unknown label set 'nope'"),
    ("media path", dict(payload={"utterances": [{"speaker": "A", "text": "hi", "video_b64": "/etc/passwd"}]}), 422, "looks like a file path"),
    ("media path field", dict(payload={"utterances": [{"speaker": "A", "text": "hi", "video_path": "/etc/passwd"}]}), 422, "never as a path"),
    ("unknown field", dict(payload={"utterances": [{"speaker": "A", "text": "hi"}], "stream": True}), 422, "stream: Extra inputs are not permitted"),
    ("no API key", dict(payload={"utterances": [{"speaker": "A", "text": "hi"}]}, headers={}), 401, "Authorization: Bearer"),
]


@pytest.mark.parametrize("name, kw, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_over_http_gets_a_4xx_naming_the_problem(service, name, kw, status, words):
    r = post(service, "/v1/recognize", **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()
    assert "root:" not in r.text  # no server file was read into an answer
    ok = post(service, "/v1/recognize", {"utterances": DIALOGUE[:1], "use_llm": False})
    assert ok.status_code == 200  # the service keeps serving


def _replicas(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"])


def test_session_survives_an_ingress_restart_and_its_turns_are_idempotent(service, models):
    import ray

    from mer_ray.vanilla.predict import VanillaPredictor

    sid = "e2e-session"
    turn = lambda u, k=None: post(service, f"/v1/sessions/{sid}/turns", {"utterance": u, "use_llm": False, "expected_turn": k})  # noqa: E731
    assert turn(DIALOGUE[0], 0).json()["turn"] == 0
    before = _replicas("Ingress")
    assert len(before) == 1
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        now = _replicas("Ingress")
        if now and now != before:
            try:
                if httpx.get(service + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    else:
        pytest.fail("no new Ingress replica came up")
    r = turn(DIALOGUE[1], 1)  # the new replica opens the same SQLite file: the session goes on
    assert r.status_code == 200 and r.json()["turn"] == 1 and r.json()["n_context"] == 2, r.text
    again = turn(DIALOGUE[1], 1)  # a retried request: the stored answer, not a third turn
    assert again.status_code == 200 and again.json() == r.json()
    ahead = turn(DIALOGUE[2], 5)
    assert ahead.status_code == 409 and ahead.json()["next_turn"] == 2, ahead.text
    r = turn(DIALOGUE[2])
    assert r.status_code == 200 and r.json()["turn"] == 2 and r.json()["n_context"] == 3, r.text
    # the predictor on the session's rows (each utterance featurized alone when its turn arrived, the
    # replicas' one torch thread, features kept exactly through the persisted JSON): bit for bit
    want = VanillaPredictor.from_dir(models / "vanilla", num_threads=1).predict_dialogue(turn_rows(DIALOGUE))["emotion_probs"][2]
    assert [r.json()["utterance"]["probs_uncalibrated"][k] for k in MELD7] == [float(x) for x in want]  # before calibration


def test_autoscaling_adds_a_featurizer_replica_under_load_and_removes_it_after(service):
    from ray import serve

    def running() -> int:
        st = serve.status().applications["mer"].deployments["Featurizer"]
        return st.replica_states.get("RUNNING", 0)

    assert running() == 1
    long = [{"speaker": f"S{i % 3}", "text": f"turn {i}: I really can't believe what happened at the party last night"} for i in range(24)]
    stop = threading.Event()
    errors: list[str] = []

    def client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(service + "/v1/recognize", json={"utterances": long, "use_llm": False}, headers=AUTH)
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    peak, t0 = 1, time.time()
    try:
        while time.time() - t0 < 60 and peak < 2:  # bounded load: at most 60 s
            peak = max(peak, running())
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:2]
    assert peak == 2, "no second Featurizer replica under load"
    t0 = time.time()
    while time.time() - t0 < 60 and running() > 1:
        time.sleep(0.5)
    assert running() == 1, "the extra replica was not removed after the load"
