"""``mer bench lantern --part backends``: the in-process prompt job beside ``backend: ray_data_http``.

Both run the same fixed subset of queries (a seeded sample of the shipped
``jobs/lantern_prompt.yaml`` queries on the first N MELD dev dialogues, in
job order), each with its shipped settings (``jobs/lantern_prompt.yaml``,
``jobs/lantern_prompt_http.yaml``) and the same total threads: two 1-thread
actors in process, a 2-thread ``llama_cpp.server`` over HTTP. Server start-up
is timed apart from the job.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def fixed_subset(queries: pa.Table, n: int, seed: int = 0) -> pa.Table:
    """``n`` queries drawn without replacement by ``seed``, kept in the table's order (a job's order)."""
    if n >= queries.num_rows:
        return queries
    idx = np.sort(np.random.default_rng(seed).choice(queries.num_rows, n, replace=False))
    return queries.take(pa.array(idx))


def compare_scores(a_dir: Path, b_dir: Path, n_batch: int = 512) -> dict:
    """Label log-probs of queries ``ok`` in both outputs: how many are bit-equal, and the largest difference.

    Split at ``n_batch`` prompt tokens: the server evaluates a longer prompt's new suffix in one
    batch, not in the in-process scorer's ``n_batch`` chunks, so only shorter prompts are expected equal.
    """
    from mer_ray.lantern.job import read_results

    def ok(d):
        t = read_results(d).to_pylist()
        return {r["query_id"]: r for r in t if r["status"] == "ok"}

    a, b = ok(a_dir), ok(b_dir)
    out = {}
    for name, keep in (("prompt_le_n_batch", lambda n: n <= n_batch), ("prompt_gt_n_batch", lambda n: n > n_batch)):
        both = sorted(q for q in set(a) & set(b) if keep(a[q]["n_prompt_tokens"]))
        d = [float(np.abs(np.array(a[q]["llm_logprobs"]) - np.array(b[q]["llm_logprobs"])).max()) for q in both]
        out[name] = {"compared": len(both), "bit_equal": int(sum(x == 0.0 for x in d)),
                     "max_abs_label_logprob_diff": max(d) if d else None}
    return out


def run_backend_bench(work: Path, vanilla: Path, data_dir: Path, n_queries: int = 200, n_dialogues: int = 40,
                      seed: int = 0, job_config: str | Path = "jobs/lantern_prompt.yaml",
                      http_config: str | Path = "jobs/lantern_prompt_http.yaml") -> dict:
    """Time both backends on the same ``n_queries``; returns the ``backends`` section of the bench JSON.

    ``job_config`` and ``http_config``: the shipped YAMLs of the two jobs (paths from the repo root), whose
    settings each side runs with.
    """
    import ray

    from mer_ray.config import load
    from mer_ray.lantern.config import PromptJobConfig
    from mer_ray.lantern.http_backend import run_http_prompt_job
    from mer_ray.lantern.job import run_prompt_job
    from mer_ray.lantern.prompt import make_queries
    from mer_ray.lantern.queries import CF_DIALOGUE
    from mer_ray.llm.llamacpp_server import llama_server
    from mer_ray.runtime import start_ray

    over = {"vanilla": str(vanilla), "splits": ["dev"], "max_dialogues": n_dialogues, "data_dir": str(data_dir)}
    loc = load(PromptJobConfig, job_config, {**over, "out": str(work / "inproc")})
    http = load(PromptJobConfig, http_config, {**over, "out": str(work / "http")})
    queries, labels = make_queries(loc)
    queries = queries.filter(pa.array([d != CF_DIALOGUE for d in queries["dialogue_id"].to_pylist()]))
    sub = fixed_subset(queries, n_queries, seed)
    threads = loc.actors * loc.backend.n_threads
    res: dict = {"job_config": str(job_config), "http_config": str(http_config), "n_queries": sub.num_rows, "drawn_from": queries.num_rows, "seed": seed,
                 "n_dialogues": n_dialogues, "sizes": loc.sizes, "stride": loc.stride,
                 "query_ids": sub["query_id"].to_pylist(), "threads_total": threads,
                 "cpu_count": os.cpu_count(), "platform": platform.platform(),
                 "load_avg_start": os.getloadavg()}
    started = start_ray(loc.ray_cpus, log_to_driver=False, worker_niceness=0)
    try:
        t0 = time.perf_counter()
        s_loc = run_prompt_job(sub, work / "inproc", loc.backend.model_dump(), labels, num_actors=loc.actors,
                               cpus_per_actor=loc.cpus_per_actor, progress=True)
        res["in_process"] = {"seconds": time.perf_counter() - t0, "engines": loc.actors,
                             "threads_per_engine": loc.backend.n_threads, "reuse_prefix": True,
                             **{k: s_loc[k] for k in ("ok", "failed", "missing", "tokens_evaluated", "tokens_reused")}}
        t0 = time.perf_counter()
        with llama_server(http.http.tokenizer, work / "server.log", alias=http.http.model, n_ctx=loc.backend.n_ctx,
                          n_batch=512, n_threads=threads) as url:
            res["server_start_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            s_http = run_http_prompt_job(sub, work / "http", http.http.model_copy(update={"base_url": url}), labels)
            res["ray_data_http"] = {"seconds": time.perf_counter() - t0, "server_threads": threads,
                                    "server_cache": False, "concurrency": http.http.concurrency,
                                    "align_prefix": http.http.align_prefix,
                                    **{k: s_http[k] for k in ("ok", "failed", "missing", "tokens_evaluated")}}
    finally:
        if started:
            ray.shutdown()
    a, b = res["in_process"], res["ray_data_http"]
    res["http_over_in_process_seconds"] = b["seconds"] / a["seconds"]
    # in process: tokens llama.cpp evaluated (the shared prefix once); HTTP: prompt tokens the
    # requests carried (before the server's own prefix reuse, which it does not report)
    res["http_over_in_process_tokens"] = b["tokens_evaluated"] / max(1, a["tokens_evaluated"])
    res["scores"] = compare_scores(work / "inproc", work / "http")
    res["load_avg_end"] = os.getloadavg()
    return res
