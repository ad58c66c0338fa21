"""`mer lantern fuse` end to end on MELD gold with synthetic LLM outputs: fit on dev only, report on test."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mer_ray.data.fields import receptive_fields
from mer_ray.lantern.job import RESULT_SCHEMA
from mer_ray.lantern.predict import FusionPredictor
from mer_ray.lantern.queries import CF_DIALOGUE

FAST = {"fusion_cal": {"calibrated": True, "weight_decay": 1e-3, "steps": 80}}
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def _inputs(meld_dir, tmp_path, test_noise_seed):
    from mer_ray.data.leak import strip_gold
    from mer_ray.data.loaders import load_meld

    rng = np.random.default_rng(0)
    parts = []
    for split in ("dev", "test"):
        t = strip_gold(load_meld(meld_dir, split))
        keep = list(dict.fromkeys(t["dialogue_id"].to_pylist()))[:12]
        parts.append(t.filter(pc.is_in(t["dialogue_id"], pa.array(keep))))
    t = pa.concat_tables(parts)
    probs = rng.dirichlet(np.ones(7) * 0.5, t.num_rows).astype(np.float32)
    van = pa.table({"dialogue_id": t["dialogue_id"], "turn": t["turn"], "speaker": t["speaker"], "text": t["text"],
                    "split": t["split"], "emotion_probs": pa.array(list(probs), pa.list_(pa.float32()))}
                   ).replace_schema_metadata({"emotion_labels": json.dumps(LABELS)})
    vpath = tmp_path / "van.parquet"
    pq.write_table(van, vpath)
    # LLM outputs: a noisy copy of the vanilla distribution per field (test noise seeded separately)
    q, r = {k: [] for k in ("query_id", "split", "dialogue_id", "field_size", "field_start", "field_end", "target_pos",
                            "target_turn", "dialogue_len", "prompt")}, []
    from mer_ray.lantern.queries import dialogues

    for d, rows in dialogues(van).items():
        split = rows[0]["split"]
        g = np.random.default_rng(1 if split == "dev" else test_noise_seed)
        for f in receptive_fields(len(rows), [2, None], 1):
            for pos in range(f.start, f.end):
                qid = f"{d}|{f.start}-{f.end}|{pos}"
                for k, v in zip(q, (qid, split, d, f.size, f.start, f.end, pos, rows[pos]["turn"], len(rows), "p")):
                    q[k].append(v)
                p = g.dirichlet(np.asarray(rows[pos]["emotion_probs"]) * 5 + 0.1)
                r.append({"query_id": qid, "status": "ok", "error": None, "llm_probs": p.tolist(), "llm_logprobs": np.log(p).tolist(),
                          "n_prompt_tokens": 10, "tokens_evaluated": 5, "tokens_reused": 5, "seconds": 0.1})
    for k, v in zip(q, (CF_DIALOGUE, None, CF_DIALOGUE, None, 0, 1, 0, None, 1, "p")):
        q[k].append(v)
    r.append({**r[0], "query_id": CF_DIALOGUE, "llm_probs": [1 / 7] * 7})
    d = tmp_path / f"llm{test_noise_seed}"
    (d / "parts").mkdir(parents=True)
    pq.write_table(pa.table(q), d / "queries.parquet")
    pq.write_table(pa.Table.from_pylist(r, schema=RESULT_SCHEMA), d / "parts" / "part-0.parquet")
    return vpath, d


@pytest.mark.slow
def test_fuse_fits_on_dev_only_and_reports_side_by_side(meld_dir, tmp_path):
    from mer_ray.lantern.fuse import run_fuse

    vpath, llm = _inputs(meld_dir, tmp_path, test_noise_seed=2)
    rep = run_fuse(vpath, [llm], meld_dir, tmp_path / "out", k=2, settings=FAST)
    assert {"vanilla", "llm_only", "llm_only_calibrated", "fused (selected)"} <= set(rep["test"])
    assert set(rep["ablation_sizes"]) == {"2", "whole", "2+whole"}
    held = rep["dev_heldout"]
    assert held[rep["selected"]]["weighted_f1"] >= held["vanilla"]["weighted_f1"]
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "report.png").exists()
    pred = FusionPredictor.from_dir(tmp_path / "out" / "fusion")
    assert pred.labels == LABELS
    # other test-split LLM outputs leave the fitted fusion unchanged: nothing is fit on test
    _, llm2 = _inputs(meld_dir, tmp_path, test_noise_seed=3)
    rep2 = run_fuse(vpath, [llm2], meld_dir, tmp_path / "out2", k=2, settings=FAST)
    assert rep2["dev_heldout"] == rep["dev_heldout"] and rep2["selected"] == rep["selected"]
    a = (tmp_path / "out" / "fusion" / "fusion.json").read_text()
    assert a == (tmp_path / "out2" / "fusion" / "fusion.json").read_text()
    if (tmp_path / "out" / "fusion" / "fusion.pt").exists():
        import torch

        s1 = torch.load(tmp_path / "out" / "fusion" / "fusion.pt")
        s2 = torch.load(tmp_path / "out2" / "fusion" / "fusion.pt")
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
