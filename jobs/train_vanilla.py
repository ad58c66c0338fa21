"""The vanilla multi-task model, end to end (extract -> train per seed -> predict -> eval), as a Ray job.

The entry point for `ray job submit` (each jobs/vanilla_*.yaml header has the
exact command). Inside a job, ``ray.init()`` joins the job's cluster; run
directly, it starts a small local Ray.

    python jobs/train_vanilla.py --config jobs/vanilla_meld.yaml --data-dir ../shared/data/meld --out runs/meld
"""

from __future__ import annotations

import argparse
import json

from mer_ray.config import load
from mer_ray.vanilla.recipe import PipelineConfig

#: The config class of this entry point's --config (tests load every shipped YAML against it).
CONFIG = PipelineConfig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a jobs/vanilla_*.yaml")
    p.add_argument("--data-dir", help="MELD directory (dataset: meld)")
    p.add_argument("--manifest", help="manifest file with a split column (dataset: manifest)")
    p.add_argument("--media-root", default=None, help="where manifest media paths resolve")
    p.add_argument("--out", required=True, help="run directory; report.json lands here")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    args = p.parse_args(argv)
    cfg = load(CONFIG, args.config, args.overrides)
    data = args.data_dir if cfg.dataset == "meld" else args.manifest
    if data is None:
        p.error(f"dataset {cfg.dataset!r} needs {'--data-dir' if cfg.dataset == 'meld' else '--manifest'}")

    from mer_ray.runtime import start_ray
    from mer_ray.vanilla.recipe import run_pipeline

    start_ray(cfg.ray_num_cpus)  # inside `ray job submit`: the job's cluster (RAY_ADDRESS)
    report = run_pipeline(cfg, data, args.out, args.media_root)
    print("REPORT", json.dumps({s: {k: round(report[s][k], 2) for k in ("weighted_f1", "weighted_f1_std", "accuracy", "macro_f1")}
                                for s in cfg.predict_splits}), flush=True)
    return report


if __name__ == "__main__":
    main()
