"""End to end on a real local Ray: real HTTP on 127.0.0.1 through httpx.

One Ray instance (``address="local"``, its own temp dir, a non-default port)
serves the app for the whole module: every bad input, sessions that survive a
replica restart and a store restart, and autoscaling of the Featurizer up under
a bounded load and back down after it (delays shortened in this test's options).
"""

from __future__ import annotations

import base64
import os
import threading
import time

import httpx
import pytest

from tests.integration.serve.test_local_mode import DIALOGUE, MELD7, tiny_models, turn_rows

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 18431
KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 3,
         "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


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
                       "sessions": {"actor_name": "mer_test_sessions", "persist_dir": str(tmp_path_factory.mktemp("sessions"))}})
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


def test_session_survives_an_ingress_restart_and_a_store_restart(service, models):
    import ray

    from mer_ray.vanilla.predict import VanillaPredictor

    sid = "e2e-session"
    turn = lambda u: post(service, f"/v1/sessions/{sid}/turns", {"utterance": u, "use_llm": False})  # noqa: E731
    assert turn(DIALOGUE[0]).json()["turn"] == 0
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
    r = turn(DIALOGUE[1])
    assert r.status_code == 200 and r.json()["turn"] == 1 and r.json()["n_context"] == 2, r.text
    store = ray.get_actor("mer_test_sessions", namespace="mer_serve")
    pid = ray.get(store.pid.remote())
    ray.kill(store, no_restart=False)  # Ray restarts it; it reloads the sessions from persist_dir
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if ray.get(store.pid.remote(), timeout=5) != pid:
                break
        except Exception:
            time.sleep(0.5)
    r = turn(DIALOGUE[2])
    assert r.status_code == 200 and r.json()["turn"] == 2 and r.json()["n_context"] == 3, r.text
    # the predictor on the session's rows (each utterance featurized alone when its turn arrived, the
    # replicas' one torch thread, features kept exactly through the persisted JSON): bit for bit
    want = VanillaPredictor.from_dir(models / "vanilla", num_threads=1).predict_dialogue(turn_rows(DIALOGUE))["emotion_probs"][2]
    assert [r.json()["utterance"]["probs"][k] for k in MELD7] == [float(x) for x in want]


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
