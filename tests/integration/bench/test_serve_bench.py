"""``mer bench serve`` end to end, tiny: every side (Serve on a real local Ray, the uvicorn baseline, in process,
batched in process) on the tiny models, one thread setting, concurrency 1 and 4, a few requests each."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.serve.test_local_mode import DIALOGUE, has_lantern, tiny_fusion, tiny_models

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tiny_models(tmp_path_factory.mktemp("models"))
    return tiny_fusion(root) if has_lantern() else root


def test_the_uvicorn_baseline_answers_with_the_serve_schema_and_its_errors(models):
    from mer_ray.bench.serve_uvicorn import UvicornServer
    from mer_ray.serve import schemas as S

    srv = UvicornServer(str(models), 18531, 1, 4)
    with srv as url:
        r = httpx.post(url + "/v1/recognize", json={"utterances": DIALOGUE, "use_llm": False}, timeout=60)
        assert r.status_code == 200, r.text
        out = S.RecognizeResponse.model_validate(r.json())
        assert len(out.utterances) == 3 and "features" in out.timing_ms and "vanilla" in out.timing_ms
        assert httpx.post(url + "/v1/recognize", json={"utterances": DIALOGUE, "video": "/etc/passwd"}).status_code == 422
        long = [{"speaker": "A", "text": "x" * 2001}]
        r = httpx.post(url + "/v1/recognize", json={"utterances": long})
        assert r.status_code == 422 and "over the limit" in r.json()["error"]
    assert srv.proc.poll() is not None  # stopped with the block


@pytest.mark.ray
def test_a_tiny_sweep_writes_every_key(models, tmp_path):
    from mer_ray.bench.serve import run_bench

    out = tmp_path / "serve.json"
    n_llm = 2 if has_lantern() else 0
    rep = run_bench(out, models_dir=str(models), n_requests=8, n_llm=n_llm, levels=[1, 4], port=18541, payload_kind="generated",
                    warmup=2, threads=[1], pools=[4])
    saved = json.loads(out.read_text())
    assert saved["partial"] is False and saved["payloads"] == "generated" and saved["models_dir"] == str(models)
    assert rep["errors"] == 0, [r["first_errors"] for r in rep["results"] if r["errors"]]
    for k in ("serve_over_uvicorn", "serve_over_inprocess", "serve_over_inprocess_batched", "p99_over_p50", "c1_p50_over_uvicorn"):
        assert rep[k] is not None and rep[k] > 0, k
    modes = {(r["mode"], r["concurrency"]) for r in rep["results"]}
    assert {("serve", 1), ("serve", 4), ("uvicorn", 1), ("uvicorn", 4), ("inprocess", 1), ("inprocess", 4),
            ("inprocess_batched", 4)} <= modes
    assert set(rep["mean_batch_size"]) >= {"Featurizer", "Vanilla", "Ingress"}
    assert set(rep["mean_batch_size"]["Featurizer"]) == {"1", "4"}
    ts = rep["thread_settings"]
    assert ts["serve"]["fastest"]["torch_threads"] == 1 and ts["uvicorn"]["fastest"] == {"torch_threads": 1, "pool": 4}
    assert ts["inprocess"]["torch_threads"] == [1] and ts["inprocess_batched"]["dialogues_per_call"] == 4
    pm = rep["paper_model"]
    assert pm["serve_cpu_ms_total"] > 0 and pm["uvicorn_cpu_ms_per_request"] > 0 and pm["rps"]["2"]["serve"] > 0
    assert rep["stage_cpu_ms"]["featurize"] > 0
    if n_llm:
        assert rep["llm"]["errors"] == 0 and rep["llm"]["rps"] > 0 and "llm" in rep["llm"]["timing_ms_mean"]
