"""Fine-tune the multimodal LLM with Ray Train + DeepSpeed ZeRO (FARCER / Emotion-LLaMA).

The entry point for `ray job submit` (each jobs/finetune_*.yaml header has the
exact command). Reads a config, trains on the cluster the job runs on, copies
the final adapter + projectors + JSON to ``out``, then evaluates on
``eval.splits`` (writing ``out/eval.json``) if any are configured.

    python jobs/finetune.py --config jobs/finetune_cpu.yaml [--set train.max_steps=5 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mer_ray.config import load
from mer_ray.mllm.config import FinetuneConfig

#: The config class of this entry point's --config (tests load every shipped YAML against it).
CONFIG = FinetuneConfig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a jobs/finetune_*.yaml")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="override, e.g. train.max_steps=5")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    args = p.parse_args(argv)
    cfg = load(FinetuneConfig, args.config, args.overrides)
    from mer_ray.mllm.train import run_finetune
    from mer_ray.runtime import start_ray

    # Inside `ray job submit`: the job's cluster (RAY_ADDRESS); run directly: a local instance.
    start_ray(cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1, address=cfg.ray.address)
    summary = run_finetune(cfg)
    print("TRAINED", json.dumps({k: summary[k] for k in ("run_name", "out", "wall_seconds")}), flush=True)
    if cfg.eval.splits and not args.no_eval:
        from mer_ray.mllm.evaluate import run_eval

        res = run_eval(cfg, cfg.out, Path(cfg.out) / "eval.json", device=cfg.eval.resolved_device())
        print("EVAL", json.dumps({s: {k: res["finetuned"][s][k] for k in ("n", "weighted_f1", "accuracy")} for s in cfg.eval.splits}), flush=True)
        summary["eval"] = res
    return summary


if __name__ == "__main__":
    main()
