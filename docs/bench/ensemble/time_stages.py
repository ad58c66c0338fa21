"""Quiet wall times of the ensemble stages that were first timed under load (docs/ensemble.md, issue 13 item 2).

Run on a quiet machine from the repo root, after `mer ensemble` built runs/ensemble_meld:
    python docs/bench/ensemble/time_stages.py [RUN_DIR] [MELD_DIR] [WORK_DIR]
It re-runs each stage into WORK_DIR (default /tmp/quiet), never into the run: the cross-fitted
references, both LLM members' dev/test predictions (compared with the run's), each fine-tuning
for 6 minutes from scratch (seconds per step, and one epoch extrapolated from it), and the
fusion + report. Writes WORK_DIR/results.json (committed as quiet_wall.json).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from mer_ray.config import load
from mer_ray.ensemble import recipe as R
from mer_ray.ensemble.config import EnsembleConfig
from mer_ray.runtime import start_ray

RUN = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ensemble_meld").resolve()
meld = str(Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/meld").resolve())
W = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/quiet")
Q = W / "out"
Q.mkdir(parents=True, exist_ok=True)
res_path = W / "results.json"
res = json.loads(res_path.read_text()) if res_path.exists() else {}
cfg = load(EnsembleConfig, "jobs/ensemble_meld.yaml", [("data_dir", meld)])
start_ray(cfg.ray_cpus)


def save():
    res_path.write_text(json.dumps(res, indent=1))


def same(a, b):
    ta, tb = pq.read_table(a), pq.read_table(b)
    pa_, pb = (np.asarray(t.column(c).to_pylist(), dtype=np.float64) for t, c in ((ta, "emotion_probs"), (tb, "emotion_probs")))
    return {
        "rows": ta.num_rows,
        "rows_committed": tb.num_rows,
        "max_abs_diff": float(np.abs(pa_ - pb).max()),
        "argmax_equal": bool((pa_.argmax(1) == pb.argmax(1)).all()),
    }


def stage(name, fn, *a, **k):
    if name in res:
        print("skip", name)
        return
    print(f"== {name}", flush=True)
    t0 = time.time()
    out = fn(*a, **k)
    res[name] = {"wall_s": round(time.time() - t0, 1), **(out or {})}
    save()
    print(name, res[name], flush=True)


# references: k=5 cross-fitted vanilla models
def refs():
    from mer_ray.ensemble.references import crossfit_references
    from mer_ray.vanilla.recipe import PipelineConfig

    r = cfg.references
    crossfit_references(
        RUN / "vanilla" / "features", Q / "references", load(PipelineConfig, r.recipe).train, r.k, r.seed, r.parallel
    )
    return same(Q / "references" / "train_references.parquet", RUN / "references" / "train_references.parquet")


stage("references", refs)

avg = {s: str(RUN / "vanilla" / "predictions" / "avg" / f"predictions_{s}.parquet") for s in cfg.splits}
for name, refsplit in (("farcer", None), ("lantern_farcer", avg)):
    md = Q / name
    md.mkdir(exist_ok=True)
    for f in (RUN / name).iterdir():
        if f.name != "predictions" and not (md / f.name).exists():
            (md / f.name).symlink_to(f)
    for split in cfg.splits:

        def pred(md=md, split=split, refsplit=refsplit, name=name):
            R._predict_llm(md, meld, split, cfg.predict_batch_size, (refsplit or {}).get(split))
            return same(
                md / "predictions" / f"predictions_{split}.parquet", RUN / name / "predictions" / f"predictions_{split}.parquet"
            )

        stage(f"{name}_predict_{split}", pred)


# training throughput: a fresh run stopped by a 6-minute budget
def rate(cfg_path, name, refs_map):
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.train import run_finetune

    out = Q / f"{name}_rate"
    sets = [
        ("data.meld_dir", meld),
        ("out", str(out)),
        ("ray.name", f"quiet_{name}"),
        ("ray.storage_path", str(Q / "ray_results")),
        ("train.time_budget_min", 6),
    ]
    sets += [(f"data.references.{s}", p) for s, p in (refs_map or {}).items()]
    run_finetune(load(FinetuneConfig, cfg_path, sets))
    m = json.loads((out / "train_summary.json").read_text())["metrics"]
    return {
        "steps": m["step"],
        "max_steps": m["max_steps"],
        "train_seconds": m["train_seconds"],
        "startup_seconds": m.get("startup_seconds"),
        "s_per_step": m["train_seconds"] / m["step"],
        "epoch_estimate_s": m["train_seconds"] / m["step"] * m["max_steps"] + (m.get("startup_seconds") or 0),
    }


stage("farcer_train_rate", rate, cfg.farcer, "farcer", None)
stage(
    "lantern_farcer_train_rate",
    rate,
    cfg.lantern_farcer,
    "lantern_farcer",
    {"train": str(RUN / "references" / "train_references.parquet"), **avg},
)


def fusion():
    from mer_ray.ensemble.experiment import run_ensemble

    seeds = sorted((RUN / "vanilla" / "predictions").glob("seed*"), key=lambda p: int(p.name[4:]))
    members = {
        n: {s: str(RUN / n / "predictions" / f"predictions_{s}.parquet") for s in cfg.splits}
        for n in ("farcer", "lantern_farcer")
    }
    rep = run_ensemble(seeds, RUN / "lantern", members, meld, Q / "report")
    return {"test_wf1": rep["test"]["ensemble"]["weighted_f1"] if "ensemble" in rep.get("test", {}) else None}


stage("fusion_report", fusion)
ray.shutdown()
print(json.dumps(res, indent=1))
