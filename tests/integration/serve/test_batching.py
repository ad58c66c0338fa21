"""Dynamic batching on a real local Ray: concurrent requests share MiniLM and vanilla passes, answers unchanged.

Both layouts are deployed side by side (``split``: Featurizer + Vanilla; ``colocated``: FeaturizerVanilla)
with fractional CPUs. Sixteen dialogues of 1 to 12 turns are sent at once through each app's Ingress
handle; every answer must equal the same ensemble called in process without batching (the plain members,
one dialogue per call) within 1e-5, and each batched deployment's ``batch_stats`` must show batches of
more than one dialogue. Serve reports every deployment healthy, so each ``check_health`` probe passed.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from tests.integration.serve.test_local_mode import tiny_models
from tests.unit.serve.test_batching import TOL, dialogues

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 18439
N = 16
#: A long batch wait makes the sixteen concurrent requests meet in a batch; nothing here is timed.
BATCH = {"max_batch_size": 8, "batch_wait_timeout_s": 0.5}


def options(layout: str) -> dict[str, dict]:
    text = ({"FeaturizerVanilla": {"num_replicas": 1, "max_ongoing_requests": 32, "user_config": BATCH,
                                   "ray_actor_options": {"num_cpus": 0.5}}} if layout == "colocated" else
            {"Featurizer": {"num_replicas": 1, "max_ongoing_requests": 32, "user_config": BATCH, "ray_actor_options": {"num_cpus": 0.4}},
             "Vanilla": {"num_replicas": 1, "max_ongoing_requests": 32, "user_config": BATCH, "ray_actor_options": {"num_cpus": 0.2}}})
    return {"Ingress": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.1}}, **text}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def apps(ray_local, models):
    # the session's Ray (tests/conftest.py): a module that shut Ray down would leave later modules without it
    from ray import serve

    from mer_ray.serve.builder import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    handles = {}
    for layout in ("split", "colocated"):
        cfg = {"models_dir": str(models), "llm": {"enabled": False}, "layout": layout}
        handles[layout] = serve.run(build_app(cfg, options(layout)), name=layout, route_prefix=f"/{layout}")
    yield handles
    serve.shutdown()


@pytest.fixture(scope="module")
def requests():
    """Sixteen dialogues of 1, 3, 7 and 12 turns, texts of 1 to 17 words, each with its own texts."""
    rng = np.random.default_rng(7)
    return [d for _ in range(N // 4) for d in dialogues(rng)]


@pytest.fixture(scope="module")
def unbatched(models, requests):
    """The same ensemble in process, one dialogue per member call (no batching anywhere)."""
    from mer_ray.serve.ensemble import Ensemble
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import VanillaMember

    ens = Ensemble.local(RequestFeaturizer(), VanillaMember(str(models)))
    return [asyncio.run(ens.recognize(d, use_llm=False)) for d in requests]


def probs(out: dict) -> np.ndarray:
    return np.asarray([[u["probs"][lab] for lab in out["labels"]] for u in out["utterances"]], dtype=np.float64)


@pytest.mark.parametrize("layout", ["split", "colocated"])
def test_concurrent_requests_are_batched_and_answer_as_unbatched(apps, requests, unbatched, layout):
    from ray import serve

    h = apps[layout]
    pending = [h.call.remote("recognize", json.dumps({"utterances": d, "use_llm": False}).encode(), {}, None) for d in requests]
    answers = [r.result(timeout_s=300) for r in pending]
    assert [s for s, _ in answers] == [200] * N, [a for s, a in answers if s != 200][:1]
    worst = max(float(np.abs(probs(a) - probs(b)).max()) for (_, a), b in zip(answers, unbatched))
    print(f"{layout}: max |delta probs| batched vs unbatched = {worst:.3g}")
    assert worst <= TOL, worst
    assert [len(a["utterances"]) for _, a in answers] == [len(d) for d in requests]

    names = ["FeaturizerVanilla"] if layout == "colocated" else ["Featurizer", "Vanilla"]
    for name in names:
        stats = serve.get_deployment_handle(name, app_name=layout).batch_stats.remote().result(timeout_s=60)
        print(f"{layout} {name}: batch_stats {stats}")
        assert set(stats) == {"calls", "items", "max"}
        assert stats["items"] == N, (name, stats)  # every request went through the batch queue once
        assert stats["max"] > 1 and stats["calls"] < N, (name, stats)
    status = serve.status().applications[layout]
    assert {d: s.status for d, s in status.deployments.items()} == {d: "HEALTHY" for d in ["Ingress", *names]}
