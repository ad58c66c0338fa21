"""The backend comparison's fixed query subset and its score comparison (``mer bench lantern --part backends``)."""

from __future__ import annotations

import pyarrow as pa

from mer_ray.bench.lantern_backends import compare_scores, fixed_subset
from mer_ray.lantern.job import RESULT_SCHEMA, write_part


def test_fixed_subset_is_seeded_sized_and_in_job_order():
    q = pa.table({"query_id": [f"q{i:03d}" for i in range(500)]})
    a, b = fixed_subset(q, 200, seed=0), fixed_subset(q, 200, seed=0)
    ids = a["query_id"].to_pylist()
    assert ids == b["query_id"].to_pylist() and len(set(ids)) == 200
    assert ids == sorted(ids)  # the job's order: a dialogue's prompts stay adjacent for prefix reuse
    assert ids != fixed_subset(q, 200, seed=1)["query_id"].to_pylist()
    assert fixed_subset(q, 900).num_rows == 500  # asking for more than there is: all of it


def _out(tmp, name, rows):
    d = tmp / name
    (d / "parts").mkdir(parents=True)
    full = [{"status": "ok", "error": None, "llm_probs": None, "tokens_evaluated": 1, "tokens_reused": 0,
             "seconds": 0.0, **r} for r in rows]
    write_part(d, pa.Table.from_pylist(full, schema=RESULT_SCHEMA), "r", 0)
    return d


def test_compare_scores_splits_at_n_batch_and_skips_failed_queries(tmp_path):
    a = _out(tmp_path, "a", [{"query_id": "s", "llm_logprobs": [-1.0, -2.0], "n_prompt_tokens": 100},
                             {"query_id": "l", "llm_logprobs": [-1.0, -2.0], "n_prompt_tokens": 900},
                             {"query_id": "f", "llm_logprobs": [-1.0, -2.0], "n_prompt_tokens": 50}])
    b = _out(tmp_path, "b", [{"query_id": "s", "llm_logprobs": [-1.0, -2.0], "n_prompt_tokens": 100},
                             {"query_id": "l", "llm_logprobs": [-1.0, -2.5], "n_prompt_tokens": 900},
                             {"query_id": "f", "status": "failed", "error": "HTTP 500", "llm_logprobs": None,
                              "n_prompt_tokens": 50}])
    c = compare_scores(a, b, n_batch=512)
    assert c["prompt_le_n_batch"] == {"compared": 1, "bit_equal": 1, "max_abs_label_logprob_diff": 0.0}
    assert c["prompt_gt_n_batch"] == {"compared": 1, "bit_equal": 0, "max_abs_label_logprob_diff": 0.5}
