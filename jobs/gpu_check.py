"""Check the GPU path of a fine-tuning config in one process, without Ray: DeepSpeed (NCCL, world 1) from the
config's DeepSpeed JSON, bf16, the same model, batches and step function as the Ray job; then export the
artifacts, reload them without DeepSpeed and score a dev subset. Prints one JSON line of figures.

For a GPU machine that lacks Ray (or to isolate DeepSpeed from Ray). ``--random-init`` builds the base
model from its config.json with random weights (when the weights cannot be copied to the machine): the
figures are then throughput and plumbing, not quality.

    python jobs/gpu_check.py --config jobs/finetune_gpu_8b.yaml --set model.base=/models/Meta-Llama-3-8B-Instruct \
        --set data.meld_dir=/data/meld --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (the first 3 are warm-up, untimed)")
    p.add_argument("--eval-n", type=int, default=100, help="dev utterances scored after reloading the artifacts")
    p.add_argument("--random-init", action="store_true", help="random weights from the base's config.json")
    p.add_argument("--out", default=None, help="where artifacts go (default: a temp dir)")
    p.add_argument("--full-eval", action="store_true", help="then run the config's eval section (subsets, baselines) on this device")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)

    from mer_ray.mllm.train import fix_cuda_arch_env

    fix_cuda_arch_env()
    import deepspeed
    import numpy as np
    import torch

    from mer_ray.config import load
    from mer_ray.mllm.artifacts import save_artifacts
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.examples import load_dialogues, stratified_keys
    from mer_ray.mllm.predict import MLLMPredictor, evaluate
    from mer_ray.mllm.train import artifact_meta, micro_batches, set_phase_lrs, setup_training, train_step

    cfg = load(FinetuneConfig, args.config, args.overrides)
    work = Path(args.out or tempfile.mkdtemp(prefix="mer-gpu-check-"))
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src = Path(cfg.model.base)
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=getattr(torch, cfg.model.dtype))
        m.save_pretrained(work / "base")
        AutoTokenizer.from_pretrained(src).save_pretrained(work / "base")
        cfg.model.base = str(work / "base")
        del m
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    t0 = time.time()
    ts = setup_training(cfg, 1)  # exactly the job's model, examples, collator, parameter groups and optimizer
    model, examples, shots, weights, labels, collate, names = ts.model, ts.examples, ts.shots, ts.weights, ts.labels, ts.collate, ts.names
    ds_cfg = ts.ds_cfg  # the DeepSpeed dict setup_training built (deepspeed_config(cfg, 1)), for the figures below
    engine, opt = ts.initialize()
    startup = time.time() - t0
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    times, toks, losses = [], 0, []
    for step in range(args.steps):
        if cfg.train.time_budget_min and sum(times) > 60 * cfg.train.time_budget_min:
            break
        set_phase_lrs(opt, cfg, step, names)
        batches = [collate(mb, train=True) for mb in micro_batches(examples, order, step, cfg.train.micro_batch, cfg.train.grad_accum, 0, 1)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(train_step(engine, batches))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t)
            toks += sum(int(b["attention_mask"].sum()) for b in batches)
    state = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else model.state_dict()
    meta = artifact_meta(cfg, shots, weights, labels, {"step": args.steps, "loss": losses[-1], "train_seconds": sum(times)})
    save_artifacts(work / "export", state, model, meta)
    del engine, opt, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    pred = MLLMPredictor.from_dir(work / "export", batch_size=cfg.eval.batch_size)
    pred.model.to("cuda" if torch.cuda.is_available() else "cpu")
    mods = {m: pc.feature for m, pc in cfg.model.projectors.items()}
    dev = load_dialogues(cfg.data.model_copy(update={"max_dialogues": {}}), "dev", mods)
    t = time.time()
    probs = pred.predict(dev, stratified_keys(dev, args.eval_n, 0), progress=False)
    score_s = time.time() - t
    rows = np.stack(list(probs.values()))
    res = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "base": cfg.model.base, "random_init": args.random_init, "deepspeed": cfg.deepspeed,
        "zero_stage": ds_cfg["zero_optimization"]["stage"], "bf16": ds_cfg.get("bf16", {}).get("enabled"),
        "startup_seconds": round(startup, 2), "timed_steps": len(times), "step_seconds_mean": sum(times) / max(1, len(times)),
        "train_tokens_per_s": toks / max(1e-9, sum(times)), "loss_first_last": [losses[0], losses[-1]],
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "eval_n": len(probs), "eval_utterances_per_s": len(probs) / score_s,
        "distributions_ok": bool(np.allclose(rows.sum(1), 1.0, atol=1e-3)),
        "dev_subset": {k: v for k, v in evaluate(probs, dev, labels).items() if k in ("weighted_f1", "accuracy")},
        "artifacts": str(work / "export"),
    }
    print("GPU_CHECK", json.dumps(res), flush=True)
    if args.full_eval and cfg.eval.splits:  # the config's eval (subsets, baselines) on this device
        from mer_ray.mllm.evaluate import run_eval

        del pred
        ev = run_eval(cfg, work / "export", work / "eval.json", device="cuda" if torch.cuda.is_available() else "cpu")
        res["eval"] = ev
        heads = {f"finetuned/{s}": ev["finetuned"][s] for s in cfg.eval.splits}
        if ev["baseline"]:
            n = ev["baseline"]["chosen_shots"]
            heads.update({f"baseline-{n}shot/{s}": v for s, v in ev["baseline"][f"{n}-shot"].items()})
            heads.update({f"baseline-{k}/{cfg.eval.splits[0]}": v[cfg.eval.splits[0]] for k, v in ev["baseline"].items() if k.endswith("-shot")})
        print("GPU_EVAL", json.dumps({k: {m: round(v[m], 2) for m in ("n", "weighted_f1", "accuracy", "macro_f1")} for k, v in heads.items()}), flush=True)
    return res


if __name__ == "__main__":
    main()
