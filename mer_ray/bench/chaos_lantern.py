"""``lantern_actor``: SIGKILL an LLM actor of the Lantern prompt job mid-run; every query is accounted for."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mer_ray.bench.chaos_cluster import Injector, compare_ids, kill_pid, processes_named

LANTERN_LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
LANTERN_BACKEND = {"kind": "llama_cpp", "model": "gemma3-270m", "n_threads": 1, "n_ctx": 1024}


def lantern_queries(n_dialogues: int = 4, seed: int = 0):
    """Queries of ``n_dialogues`` synthetic dialogues (vanilla probabilities drawn at random), with their
    prompts for the packaged Gemma 3 270M, plus the content-free query."""
    import numpy as np
    import pyarrow as pa

    from mer_ray.demo.corpus import make_rows
    from mer_ray.lantern.queries import build_queries, with_content_free
    from mer_ray.llm.backends import prompt_format_for
    from mer_ray.llm.prompts import PromptTemplate

    rows = [r for r in make_rows(n_dialogues, seed=seed)]
    probs = np.random.default_rng(seed).dirichlet(np.ones(7), len(rows)).astype(np.float32)
    van = pa.table({"dialogue_id": [r["dialogue_id"] for r in rows], "turn": [r["turn"] for r in rows],
                    "speaker": [r["speaker"] for r in rows], "text": [r["text"] for r in rows], "split": [r["split"] for r in rows],
                    "emotion_probs": pa.array(list(probs), pa.list_(pa.float32()))})
    van = van.replace_schema_metadata({"emotion_labels": json.dumps(LANTERN_LABELS)})
    chat, bos, eos = prompt_format_for(LANTERN_BACKEND)
    tpl = PromptTemplate.load()
    q = build_queries(van, tpl, [2], stride=2, chat_template=chat, bos_token=bos, eos_token=eos)
    return with_content_free(q, tpl, LANTERN_LABELS, chat, bos, eos), tpl.labels(LANTERN_LABELS, chat is not None)


def _raw_part_ids(out_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [q for f in sorted((out_dir / "parts").glob("*.parquet")) for q in pq.read_table(f, columns=["query_id"])["query_id"].to_pylist()]


def run_lantern_scenario(work_dir: str | Path, n_dialogues: int = 4, num_actors: int = 2) -> dict:
    """The Lantern prompt job twice on the attached cluster (clean; then one LLM actor SIGKILLed at 20-80% of
    the queries). Ids and label log-probs are compared with the clean run's (``exact`` or the largest difference)."""
    import numpy as np

    from mer_ray.lantern.job import read_results, run_prompt_job

    work_dir = Path(work_dir)
    queries, labels = lantern_queries(n_dialogues)
    kw = dict(backend=LANTERN_BACKEND, labels=labels, num_actors=num_actors, cpus_per_actor=0.5, max_group=2, progress=False)
    t0 = time.time()
    clean_sum = run_prompt_job(queries, work_dir / "clean", **kw)
    clean_s = time.time() - t0
    out = work_dir / "chaos"
    n = queries.num_rows
    killed: dict = {}

    def progress() -> float:
        parts = out / "parts"
        return len(_raw_part_ids(out)) / n if parts.exists() else 0.0

    def strike():
        pids = processes_named("MapBatches(ScorerWorker)")
        if not pids:
            return None
        kill_pid(pids[0])
        killed["wall"], killed["done"] = time.time(), len(_raw_part_ids(out))
        return "Lantern LLM actor (ScorerWorker)", pids[0]

    inj = Injector(progress, strike)
    inj.start()
    t0 = time.time()
    summary = run_prompt_job(queries, out, **kw)
    wall = time.time() - t0
    injected = inj.finish()
    clean, got = read_results(work_dir / "clean"), read_results(out)
    raw = _raw_part_ids(out)
    ids = compare_ids(clean["query_id"].to_pylist(), raw)  # raw parts: a query scored twice would show here
    a = {q: lp for q, lp in zip(clean["query_id"].to_pylist(), clean["llm_logprobs"].to_pylist())}
    b = {q: lp for q, lp in zip(got["query_id"].to_pylist(), got["llm_logprobs"].to_pylist())}
    sa = dict(zip(clean["query_id"].to_pylist(), clean["status"].to_pylist()))
    sb = dict(zip(got["query_id"].to_pylist(), got["status"].to_pylist()))
    diff = 0.0
    for q in a:
        if a[q] is not None and b.get(q) is not None:
            diff = max(diff, float(np.max(np.abs(np.asarray(a[q]) - np.asarray(b[q])))))
    after = [f.stat().st_mtime - killed["wall"] for f in (out / "parts").glob("*.parquet") if killed and f.stat().st_mtime > killed["wall"]]
    return {"injected": injected, **{k: ids[k] for k in ("expected", "observed", "lost", "duplicated")}, "failed_requests": {},
            "recovery_s": round(min(after), 3) if after else None, "recovery_note": "from the kill to the next result part written",
            "status_equal": sa == sb, "ok": summary["ok"], "failed": summary["failed"], "missing": summary["missing"],
            "clean_summary": {k: clean_sum[k] for k in ("queries", "ok", "failed", "missing")},
            "max_abs_logprob_diff": diff, "logprobs_exact": all(a[q] == b.get(q) for q in a), "retried": summary["retried"],
            "wall_s": round(wall, 2), "clean_wall_s": round(clean_s, 2), "tolerance": 0.0}

