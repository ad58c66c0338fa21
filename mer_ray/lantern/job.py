"""The Lantern prompting batch job on Ray Data.

Queries are grouped by dialogue (all prompts of a dialogue share long prefixes);
each group is one input row, so a group never splits across actors. An actor
pool of LLM engines scores them; inside a group prompts are sorted so each
prefix-trie node is evaluated once, and the header (instructions, few-shot)
stays cached across groups. The driver writes each result batch atomically
as a Parquet part, so a re-run skips what is done (``ok``) and retries failures.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mer_ray.reruns import ACTOR_FT, fetch_blocks, run_with_reruns

RESULT_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("llm_probs", pa.list_(pa.float32())), ("llm_logprobs", pa.list_(pa.float64())),
    ("n_prompt_tokens", pa.int64()), ("tokens_evaluated", pa.int64()), ("tokens_reused", pa.int64()),
    ("seconds", pa.float64()),
])


class ScorerWorker:
    """Ray Data actor: ``__init__`` loads the engine; ``__call__`` scores groups of queries.

    Args:
        backend: a :class:`~mer_ray.llm.backends.BackendConfig` as a dict.
        labels: label strings to score (already verbalised for the template).
    """

    def __init__(self, backend: dict, labels: list[str]):
        from mer_ray.llm.backends import build_scorer

        self.scorer = build_scorer(backend)
        self.labels = list(labels)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        """``batch``: ``query_ids`` and ``prompts``, one list per group. Returns one row per query.

        The result is an Arrow table in :data:`RESULT_SCHEMA` (typed, so null errors and
        list columns survive Ray's batch conversions unchanged).
        """
        rows: dict[str, list] = {f.name: [] for f in RESULT_SCHEMA}
        for qids, prompts in zip(batch["query_ids"], batch["prompts"]):
            order = sorted(range(len(prompts)), key=lambda i: prompts[i])  # trie (DFS) order
            for i in order:
                t0 = time.perf_counter()
                (r,) = self.scorer.score([prompts[i]], self.labels)
                rows["query_id"].append(str(qids[i]))
                rows["status"].append("ok" if r.ok else "failed")
                rows["error"].append(r.error)
                rows["llm_probs"].append(None if r.probs is None else r.probs.astype(np.float32).tolist())
                rows["llm_logprobs"].append(None if r.logprobs is None else r.logprobs.tolist())
                rows["n_prompt_tokens"].append(r.n_prompt_tokens)
                rows["tokens_evaluated"].append(r.tokens_evaluated)
                rows["tokens_reused"].append(r.tokens_reused)
                rows["seconds"].append(time.perf_counter() - t0)
        return pa.table({f.name: pa.array(rows[f.name], f.type) for f in RESULT_SCHEMA}, schema=RESULT_SCHEMA)


def read_results(out_dir: str | Path) -> pa.Table:
    """All result parts of a run, one row per query (an ``ok`` row wins over a failed one)."""
    parts = Path(out_dir) / "parts"
    files = sorted(parts.glob("*.parquet")) if parts.exists() else []
    if not files:
        return RESULT_SCHEMA.empty_table()
    t = pads.dataset([str(f) for f in files], format="parquet", schema=RESULT_SCHEMA).to_table()
    best: dict[str, int] = {}
    for i, (q, s) in enumerate(zip(t["query_id"].to_pylist(), t["status"].to_pylist())):
        if q not in best or s == "ok":
            best[q] = i
    return t.take(sorted(best.values()))


def _groups(queries: pa.Table, max_group: int) -> list[dict]:
    out: dict[str, dict] = {}
    for q, d, p in zip(queries["query_id"].to_pylist(), queries["dialogue_id"].to_pylist(), queries["prompt"].to_pylist()):
        g = out.setdefault(d, {"query_ids": [], "prompts": []})
        g["query_ids"].append(q)
        g["prompts"].append(p)
    groups = []
    for g in out.values():  # very long dialogues split so actors share the load
        for i in range(0, len(g["prompts"]), max_group):
            groups.append({"query_ids": g["query_ids"][i:i + max_group], "prompts": g["prompts"][i:i + max_group]})
    return groups


def write_part(out_dir: Path, table: pa.Table, run_id: str, idx: int) -> int:
    """Write one result part atomically; returns its rows."""
    table = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    final = out_dir / "parts" / f"part-{run_id}-{idx:05d}.parquet"
    tmp = final.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)  # atomic: a killed run leaves whole parts only
    return table.num_rows


def run_prompt_job(queries: pa.Table, out_dir: str | Path, backend: dict, labels: list[str],
                   num_actors: int = 1, cpus_per_actor: float = 1.0, max_group: int = 400,
                   retry_failed: bool = True, progress: bool = True) -> dict:
    """Score every query not already done in ``out_dir``; returns a summary (counts, seconds).

    Ray must be initialised by the caller. ``queries`` is :func:`build_queries`'s table.
    """
    import ray

    out_dir = Path(out_dir)
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    pq.write_table(queries, out_dir / "queries.parquet")
    done = read_results(out_dir)
    skip = {q for q, s in zip(done["query_id"].to_pylist(), done["status"].to_pylist())
            if s == "ok" or not retry_failed}
    todo = queries.filter(pa.array([q not in skip for q in queries["query_id"].to_pylist()], pa.bool_()))
    t0 = time.perf_counter()
    retried = {"attempts": 0, "errors": [], "queries_redone": 0}
    written: set[str] = set()  # query ids with a result part from this call (parts are atomic)

    def run_left(attempt: int) -> None:
        # a re-run after a lost actor or node scores only the queries without a result from this call
        left = todo.filter(pa.array([q not in written for q in todo["query_id"].to_pylist()], pa.bool_()))
        if not left.num_rows:
            return
        retried["attempts"] = attempt
        if attempt > 1:
            retried["queries_redone"] += left.num_rows
        _score(ray, left, out_dir, backend, labels, num_actors, cpus_per_actor, max_group, progress, written)

    # fault tolerance (mer_ray/reruns.py): a lost LLM actor or node fails the Ray Data run; the queries without
    # a result part are re-run with new actors, the parts already written stay
    run_with_reruns(run_left, retried, "prompt job")
    return summarise(queries, out_dir, todo, len(written), time.perf_counter() - t0, retried)


def _score(ray, todo: pa.Table, out_dir: Path, backend, labels, num_actors, cpus_per_actor, max_group, progress,
           written: set[str]) -> None:
    """One Ray Data run over ``todo``; each result batch is written as a part as it comes (ids added to ``written``)."""

    if todo.num_rows:
        groups = _groups(todo, max_group)
        ds = ray.data.from_items(groups, override_num_blocks=len(groups))
        # A dead actor fails the run (no Ray restart: mer_ray/reruns.py); SPREAD puts actors on different nodes.
        ds = ds.map_batches(ScorerWorker, fn_constructor_kwargs={"backend": backend, "labels": labels},
                            batch_size=1, batch_format="numpy", num_cpus=cpus_per_actor,
                            compute=ray.data.ActorPoolStrategy(size=num_actors), scheduling_strategy="SPREAD", **ACTOR_FT)
        run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=todo.num_rows, desc="lantern prompts", unit="q")
        try:
            for i, batch in enumerate(fetch_blocks(ray, ds)):
                n = write_part(out_dir, batch, run_id, i)
                written.update(batch["query_id"].to_pylist())
                if bar:
                    bar.update(n)
        finally:
            if bar:
                bar.close()


def summarise(queries: pa.Table, out_dir: Path, todo: pa.Table, n_written: int, wall: float, retried: dict | None = None) -> dict:
    """Count every query of ``queries`` as ok, failed or missing; writes and returns ``summary.json``."""
    res = read_results(out_dir)
    status = dict(zip(res["query_id"].to_pylist(), res["status"].to_pylist()))
    errors: dict[str, int] = {}
    for _q, s, e in zip(res["query_id"].to_pylist(), res["status"].to_pylist(), res["error"].to_pylist()):
        if s != "ok":
            key = (e or "unknown").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    all_ids = queries["query_id"].to_pylist()
    summary = {
        "queries": len(all_ids), "ok": sum(status.get(q) == "ok" for q in all_ids),
        "failed": sum(status.get(q) == "failed" for q in all_ids),
        "missing": sum(q not in status for q in all_ids), "failed_by_reason": errors,
        "scored_this_run": n_written, "skipped_done": queries.num_rows - todo.num_rows,
        "wall_seconds": wall, "retried": retried or {},
        "tokens_evaluated": int(np.sum(res["tokens_evaluated"].to_numpy(zero_copy_only=False))),
        "tokens_reused": int(np.sum(res["tokens_reused"].to_numpy(zero_copy_only=False))),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_llm_outputs(out_dir: str | Path) -> pa.Table:
    """Queries (without prompts) joined with their results: the input of fusion and the report."""
    out_dir = Path(out_dir)
    import pyarrow.compute as pc

    q = pq.read_table(out_dir / "queries.parquet").drop_columns(["prompt"])
    res = read_results(out_dir)
    idx = pc.index_in(q["query_id"], value_set=res["query_id"])  # null: never scored
    got = res.take(idx)
    for name in res.column_names:
        if name != "query_id":
            q = q.append_column(name, got[name])
    return q
