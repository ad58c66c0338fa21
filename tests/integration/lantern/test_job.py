"""The Lantern prompt job: the worker on a plain dict, and a real Ray Data run that resumes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mer_ray.lantern.job import ScorerWorker, load_llm_outputs, read_results, run_prompt_job
from mer_ray.lantern.queries import build_queries, with_content_free
from mer_ray.llm.prompts import PromptTemplate

pytestmark = pytest.mark.slow
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def _vanilla(meld_dir, n_dialogues=2):
    from mer_ray.data.leak import strip_gold
    from mer_ray.data.loaders import load_meld

    t = strip_gold(load_meld(meld_dir, "dev"))
    from collections import Counter

    n = Counter(t["dialogue_id"].to_pylist())
    keep = [d for d in dict.fromkeys(t["dialogue_id"].to_pylist()) if 4 <= n[d] <= 6][:n_dialogues]
    t = t.filter(pc.is_in(t["dialogue_id"], pa.array(keep)))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), t.num_rows).astype(np.float32)
    out = pa.table({"dialogue_id": t["dialogue_id"], "turn": t["turn"], "speaker": t["speaker"], "text": t["text"],
                    "split": t["split"], "emotion_probs": pa.array(list(probs), pa.list_(pa.float32()))})
    return out.replace_schema_metadata({"emotion_labels": json.dumps(LABELS)})


@pytest.fixture(scope="module")
def setup(meld_dir):
    from mer_ray.llm.backends import prompt_format_for

    backend = {"kind": "llama_cpp", "model": "smollm2-135m-instruct", "n_threads": 1, "n_ctx": 1024}
    chat, bos, eos = prompt_format_for(backend)
    tpl = PromptTemplate.load()
    return backend, (chat, bos, eos), tpl, tpl.labels(LABELS, chat is not None)


def test_worker_scores_a_plain_batch_without_ray(meld_dir, setup):
    backend, fmt, tpl, labels = setup
    q = build_queries(_vanilla(meld_dir, 1), tpl, [2], stride=2, chat_template=fmt[0], bos_token=fmt[1], eos_token=fmt[2])
    q = q.slice(0, 4)
    worker = ScorerWorker(backend, labels)
    out = worker({"query_ids": [q["query_id"].to_pylist()], "prompts": [q["prompt"].to_pylist()]})
    assert sorted(out["query_id"].to_pylist()) == sorted(q["query_id"].to_pylist())
    assert set(out["status"].to_pylist()) == {"ok"}
    probs = np.array(out["llm_probs"].to_pylist())
    # float64 softmax stored as float32: 7 roundings of <= 2**-25 each, so |sum - 1| < 3e-7 (float64 sum)
    assert probs.shape == (4, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert sum(out["tokens_reused"].to_pylist()) > 0  # prompts of one field share their prefix


@pytest.mark.ray
def test_ray_job_accounts_for_every_query_and_resumes(meld_dir, setup, ray_local, tmp_path):
    backend, fmt, tpl, labels = setup
    from mer_ray.llm.llamacpp import LlamaCppScorer

    van = _vanilla(meld_dir, 2)
    q_all = with_content_free(build_queries(van, tpl, [2, None], stride=2, chat_template=fmt[0], bos_token=fmt[1],
                                            eos_token=fmt[2]), tpl, LABELS, *fmt)
    sc = LlamaCppScorer("smollm2-135m-instruct", n_ctx=256, n_threads=1)
    lens = sorted(len(sc.tokenize(p)) for p in q_all["prompt"].to_pylist())
    n_ctx = (lens[len(lens) // 2] + lens[-1]) // 2 + 8  # the longest (whole-dialogue) prompts overflow
    backend = {**backend, "n_ctx": n_ctx}
    first = q_all.filter(pc.is_in(q_all["dialogue_id"], pa.array([van["dialogue_id"][0].as_py()])))
    s1 = run_prompt_job(first, tmp_path, backend, labels, num_actors=1, cpus_per_actor=1, progress=False)
    assert s1["queries"] == first.num_rows == s1["ok"] + s1["failed"] and s1["missing"] == 0
    s2 = run_prompt_job(q_all, tmp_path, backend, labels, num_actors=1, cpus_per_actor=1, progress=False)
    assert s2["skipped_done"] == s1["ok"]  # resumed: done queries are not scored again
    assert s2["queries"] == q_all.num_rows == s2["ok"] + s2["failed"] and s2["missing"] == 0
    assert s2["failed"] > 0 and set(s2["failed_by_reason"]) == {"context overflow"}
    res = read_results(tmp_path)
    assert res.num_rows == q_all.num_rows and sorted(res["query_id"].to_pylist()) == sorted(q_all["query_id"].to_pylist())
    joined = load_llm_outputs(tmp_path)
    ok = joined.filter(pc.equal(joined["status"], "ok"))
    assert all(len(p) == 7 for p in ok["llm_probs"].to_pylist())
    assert sum(ok["tokens_reused"].to_pylist()) > 0
