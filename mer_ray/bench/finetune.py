"""`mer bench train`: the same LoRA steps, plain PyTorch vs Ray Train + DeepSpeed ZeRO-2 (1 worker).

Both sides load the same base LLM with the same LoRA, take the same batches
(built once, fixed sequence length, saved to a file the Ray worker reads), use
the same number of torch threads (the Ray worker gets that many CPUs, and
``OMP_NUM_THREADS`` to match), and time only the steps after a warm-up. Ray's
start-up (``trainer.fit()`` until the first step begins) is reported apart.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_batches(base: str, meld_dir: Path, n: int, seq_len: int, batch: int) -> list[dict]:
    """``n`` training batches of ``batch`` MELD prompts, every row exactly ``seq_len`` tokens."""
    from mer_ray.data.labels import get_label_set
    from mer_ray.mllm.build import load_causal_lm
    from mer_ray.mllm.examples import Collator, DataConfig, PromptConfig, build_example, class_weights, load_dialogues, sample_shots

    labels = get_label_set("meld7").labels
    _, tok = load_causal_lm(base)
    dialogues = load_dialogues(DataConfig(meld_dir=str(meld_dir), max_dialogues={"train": 40}), "train", {})
    prompt = PromptConfig(n_shots=7, context_turns=20, max_tokens=seq_len - 4)  # long prompts: few pad positions
    shots = sample_shots(dialogues, 7, 0, labels)
    examples = [build_example(d, i, prompt, labels, shots, None) for d in dialogues for i in range(len(d.rows))][::-1]
    collate = Collator(tok, labels, class_weights(dialogues, labels), prompt.max_tokens, pad_to=seq_len)
    return [collate(examples[k * batch : (k + 1) * batch], train=True) for k in range(n)]


def _model(base: str):
    from mer_ray.mllm.build import LoraSettings, ModelConfig, build_mllm, set_trainable

    torch.manual_seed(0)
    model, _ = build_mllm(ModelConfig(base=base, lora=LoraSettings()))
    set_trainable(model)
    return model.train()


def plain_steps(base: str, batches: list[dict], threads: int) -> dict:
    """Plain PyTorch: forward, backward, clip (as the DeepSpeed config does), AdamW step."""
    torch.set_num_threads(threads)
    t0 = time.time()
    model = _model(base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    startup = time.time() - t0
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        loss = model(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    return {"times": times, "losses": losses, "startup_seconds": startup, "threads": torch.get_num_threads()}


def _ray_loop(config: dict) -> None:
    import deepspeed
    import ray.train

    from mer_ray.mllm.config import FinetuneConfig, deepspeed_config

    torch.set_num_threads(config["threads"])
    model = _model(config["base"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    cfg = FinetuneConfig(deepspeed="zero2_cpu.json", train={"micro_batch": config["batch"], "grad_accum": 1})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1))
    batches = torch.load(config["batches"])
    first = time.time()
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        loss = engine(b)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    res = {"times": times, "losses": losses, "first_step_wall": first, "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(config["result_file"]).write_text(json.dumps(res))  # same machine (1 local worker); Result.metrics keeps checkpointed reports only
    ray.train.report(res)


def ray_steps(base: str, batches_file: str, threads: int, batch: int) -> dict:
    """Ray Train + DeepSpeed ZeRO-2, one worker with ``threads`` CPUs."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.time()
    from mer_ray.runtime import start_ray

    start_ray(threads + 1, env={"OMP_NUM_THREADS": str(threads)})
    init_s = time.time() - t0
    try:
        result_file = str(Path(batches_file).with_suffix(".ray.json"))
        trainer = TorchTrainer(_ray_loop, train_loop_config={"base": base, "batches": batches_file, "threads": threads, "batch": batch,
                                                             "result_file": result_file},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                               torch_config=TorchConfig(backend="gloo"),
                               run_config=RunConfig(name=f"bench-train-{os.getpid()}-{int(t0)}", storage_path=tempfile.mkdtemp(prefix="mer-bench-")))
        t1 = time.time()
        trainer.fit()
        m = json.loads(Path(result_file).read_text())
    finally:
        ray.shutdown()
    return {**m, "ray_init_seconds": init_s, "startup_seconds": m["first_step_wall"] - t1}


def run_bench(out: Path, steps: int = 6, warmup: int = 2, seq_len: int = 256, batch: int = 1, threads: int = 2,
              base: str = "gemma3-270m", meld_dir: Path | None = None) -> dict:
    """Run both sides, write the JSON (key ``overhead`` = Ray time / plain time - 1 over the timed steps)."""
    from mer_ray.data.loaders import meld_dir as resolve_meld

    batches = make_batches(base, resolve_meld(meld_dir), warmup + steps, seq_len, batch)
    real = int(sum(int(b["attention_mask"].sum()) for b in batches[warmup:]))
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "batches.pt")
        torch.save(batches, path)
        plain = plain_steps(base, batches, threads)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"partial": "plain side only (the Ray side did not finish)", "plain": plain}))
        ray_res = ray_steps(base, path, threads, batch)
    tokens = steps * batch * seq_len
    p_t, r_t = sum(plain["times"][warmup:]), sum(ray_res["times"][warmup:])
    res = {
        "base": base, "steps": steps, "warmup": warmup, "seq_len": seq_len, "batch": batch,
        "tokens_per_step": batch * seq_len, "non_pad_token_fraction": real / tokens,
        "threads": {"plain": plain["threads"], "ray_worker": ray_res["threads"], "ray_worker_OMP_NUM_THREADS": ray_res["omp_num_threads"]},
        "plain_seconds": p_t, "ray_seconds": r_t,
        "plain_tokens_per_s": tokens / p_t, "ray_tokens_per_s": tokens / r_t,
        "ratio_ray_over_plain_tokens_per_s": (tokens / r_t) / (tokens / p_t),
        "overhead": r_t / p_t - 1.0,
        "goal_overhead_max": 0.15,
        "plain_step_median_s": statistics.median(plain["times"][warmup:]),
        "ray_step_median_s": statistics.median(ray_res["times"][warmup:]),
        "plain_startup_seconds": plain["startup_seconds"],
        "ray_startup_seconds": ray_res["startup_seconds"], "ray_init_seconds": ray_res["ray_init_seconds"],
        "losses": {"plain": plain["losses"], "ray": ray_res["losses"]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "note": "measured while other processes may share the machine; compare both sides of one run only",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
    return res
