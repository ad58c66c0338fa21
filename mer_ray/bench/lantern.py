"""``mer bench lantern``: the Ray prompt job vs a naive loop vs the prefix-trie floor (``--part job``),
and the in-process job beside ``backend: ray_data_http`` (``--part backends``, :mod:`.lantern_backends`).

Queries are fixed: every query of the first N MELD dev dialogues at the given
sizes, default template, Gemma 3 270M, references from a fixed vanilla file (a
quick TF-IDF model trained on MELD train if none is given). All
measurements of a part use the same total thread count.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def trie_size(token_lists: list[list[int]]) -> int:
    """Nodes of the prompts' prefix trie: the distinct prompt tokens a perfect cache evaluates once."""
    seqs = sorted(tuple(t) for t in token_lists)
    total, prev = 0, ()
    for s in seqs:
        lcp = 0
        while lcp < min(len(s), len(prev)) and s[lcp] == prev[lcp]:
            lcp += 1
        total += len(s) - lcp
        prev = s
    return total


def run_bench(out: str | Path, vanilla: str | Path | None, data_dir: str | Path | None, n_dialogues: int = 40,
              sizes: str = "4,8,whole", actors: int = 2, threads: int = 1, part: str = "job",
              http_queries: int = 200) -> dict:
    """Run ``part`` (``job``, ``backends`` or ``all``) on the first ``n_dialogues`` MELD dev dialogues; writes ``out``.

    ``job``: Ray job vs naive loop vs the prefix-trie floor (``sizes``, ``actors``, ``threads``).
    ``backends``: in-process vs ``ray_data_http`` on a fixed ``http_queries`` of the shipped job's queries.
    """
    from mer_ray.data.loaders import meld_dir

    if part not in ("job", "backends", "all"):
        raise ValueError(f"part must be job, backends or all, not {part!r}")
    data_dir = meld_dir(data_dir)
    work = Path(tempfile.mkdtemp(prefix="mer-bench-lantern-"))
    if vanilla is None:
        from mer_ray.bench.quick_vanilla import quick_vanilla_predictions

        vanilla = work / "vanilla_quick.parquet"
        quick_vanilla_predictions(data_dir, splits=("dev",), out=vanilla)
    res: dict = {"part": part, "vanilla": str(vanilla)}
    if part in ("job", "all"):
        res.update(_job_vs_naive(work, vanilla, n_dialogues, sizes, actors, threads))
    if part in ("backends", "all"):
        from mer_ray.bench.lantern_backends import run_backend_bench

        res["backends"] = run_backend_bench(work / "backends", Path(vanilla), data_dir, http_queries, n_dialogues)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
    return res


def _job_vs_naive(work: Path, vanilla: str | Path, n_dialogues: int, sizes: str, actors: int, threads: int) -> dict:
    """The Ray job, a naive loop and the prefix-trie floor on the same queries and total threads."""
    from mer_ray.lantern.config import PromptJobConfig
    from mer_ray.lantern.job import run_prompt_job
    from mer_ray.lantern.prompt import make_queries
    from mer_ray.lantern.queries import CF_DIALOGUE
    from mer_ray.llm.llamacpp import LlamaCppScorer
    from mer_ray.runtime import start_ray

    total_threads = actors * threads
    cfg = PromptJobConfig(vanilla=str(vanilla), out=str(work / "job"), splits=["dev"], sizes=sizes,
                          max_dialogues=n_dialogues, actors=actors, cpus_per_actor=1.0, ray_cpus=max(2, actors),
                          backend={"kind": "llama_cpp", "model": "gemma3-270m", "n_threads": threads})
    queries, labels = make_queries(cfg)
    queries = queries.filter(np.array([d != CF_DIALOGUE for d in queries["dialogue_id"].to_pylist()]))
    prompts = queries["prompt"].to_pylist()
    res: dict = {"n_queries": len(prompts), "n_dialogues": n_dialogues, "sizes": sizes, "stride": cfg.stride,
                 "template": cfg.template, "vanilla": str(vanilla), "model": "gemma3-270m",
                 "threads_per_engine": threads, "engines": actors, "threads_total": total_threads,
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()}

    # 1. the Ray job (Ray start-up measured apart)
    import ray

    t0 = time.perf_counter()
    started = start_ray(cfg.ray_cpus, log_to_driver=False, worker_niceness=0)
    res["ray_start_seconds"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        summary = run_prompt_job(queries, work / "job", cfg.backend.model_dump(), labels, num_actors=actors,
                                 cpus_per_actor=1.0, progress=True)
        res["ray_job_seconds"] = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    res["ray_job"] = {k: summary[k] for k in ("ok", "failed", "missing", "tokens_evaluated", "tokens_reused")}

    # 2. naive loop: one Llama, reset() and a full evaluation per prompt
    naive = LlamaCppScorer("gemma3-270m", n_threads=total_threads, reuse_prefix=False)
    from tqdm import tqdm

    t0 = time.perf_counter()
    scores = []
    for i in tqdm(range(0, len(prompts), 20), desc="naive loop", unit_scale=20, unit="q"):
        scores += naive.score(prompts[i:i + 20], labels)
    res["naive_seconds"] = time.perf_counter() - t0
    toks = [naive.tokenize(p) for p in prompts]
    # the job's distributions against a fresh evaluation of every prompt (KV reuse must not change them)
    from mer_ray.lantern.job import read_results

    job_probs = dict(zip(*read_results(work / "job").select(["query_id", "llm_probs"]).to_pydict().values()))
    diffs = [float(np.abs(np.asarray(job_probs[q], dtype=np.float64) - sc.probs).max())
             for q, sc in zip(queries["query_id"].to_pylist(), scores) if sc.ok and job_probs.get(q) is not None]
    res["job_vs_naive_max_abs_prob_diff"] = max(diffs) if diffs else None
    res["job_vs_naive_compared"] = len(diffs)
    res["naive_tokens_evaluated"] = int(sum(s.tokens_evaluated for s in scores))

    # 3. raw prompt-evaluation rate on one 512-token prompt, and the prefix-trie floor
    long = [t for tl in sorted(toks, key=len, reverse=True) for t in tl[1:]]
    probe = ([toks[0][0]] + long)[:512]
    times = []
    for _ in range(3):
        naive.llm.reset()
        t0 = time.perf_counter()
        naive.llm.eval(probe)
        times.append(time.perf_counter() - t0)
    rate = len(probe) / min(times)
    res["raw_prompt_tokens_per_second"] = rate
    res["trie_tokens"] = trie_size(toks)
    res["total_prompt_tokens"] = int(sum(len(t) for t in toks))
    res["floor_seconds"] = res["trie_tokens"] / rate
    res["speedup_vs_naive"] = res["naive_seconds"] / res["ray_job_seconds"]
    res["wall_over_floor"] = res["ray_job_seconds"] / res["floor_seconds"]
    res["goals"] = {"speedup_vs_naive>=5": res["speedup_vs_naive"] >= 5, "wall_over_floor<=1.5": res["wall_over_floor"] <= 1.5}
    res["load_avg_end"] = os.getloadavg()
    return res
