"""Ray Train + DeepSpeed ZeRO fine-tuning of the multimodal LLM (FARCER, Emotion-LLaMA coarse-to-fine).

The loop builds the plain-PyTorch model (:mod:`mer_ray.mllm.build`),
initialises DeepSpeed inside each worker from a JSON config kept beside this
file (``mer_ray/mllm/deepspeed/``), and calls pure step functions. Every
``checkpoint_every`` steps each rank writes its DeepSpeed state and reports it
to Ray, so a restarted worker group (``FailureConfig``) resumes from there. The
last report carries ``export/``: the peft adapter, projector safetensors and a
JSON, reloadable without Ray or DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mer_ray.mllm.artifacts import save_artifacts
from mer_ray.mllm.build import build_mllm, set_trainable, trainable_groups
from mer_ray.mllm.config import FinetuneConfig, deepspeed_config
from mer_ray.mllm.examples import TEMPLATE_VERSION, Collator, build_example, class_weights, load_dialogues, sample_shots


def make_examples(cfg: FinetuneConfig, split: str):
    """``(examples, dialogues, shots, class weights)`` of ``split`` (gold past labels when configured)."""
    from mer_ray.data.labels import get_label_set

    labels = get_label_set(cfg.model.label_set).labels
    mods = {m: p.feature for m, p in cfg.model.projectors.items()}
    train = load_dialogues(cfg.data, cfg.data.train_split, mods)
    dialogues = train if split == cfg.data.train_split else load_dialogues(cfg.data, split, mods)
    shots = sample_shots(train, cfg.prompt.n_shots, cfg.prompt.shot_seed, labels)
    weights = class_weights(train, labels) if cfg.train.class_weights == "balanced" else {lab: 1.0 for lab in labels}
    examples = []
    for d in dialogues:
        past = [r.get("label") for r in d.rows]
        examples += [build_example(d, i, cfg.prompt, labels, shots, past) for i in range(len(d.rows))]
    return examples, dialogues, shots, weights


def make_segments(cfg: FinetuneConfig, split: str, tokenizer):
    """``(segments, encoder, class weights)`` of ``split`` for template ``farcer-dialogue-v1`` (gold labels only
    as training targets, never in the sequence)."""
    from mer_ray.mllm.dialogue import DialogueEncoder, read_references

    labels = model_labels(cfg)
    mods = {m: p.feature for m, p in cfg.model.projectors.items()}
    dialogues = load_dialogues(cfg.data, split, mods)
    weights = class_weights(dialogues, labels) if cfg.train.class_weights == "balanced" else {lab: 1.0 for lab in labels}
    if cfg.prompt.references and split not in cfg.data.references:
        raise ValueError(f"prompt.references is on: give data.references.{split} (for train: cross-fitted vanilla predictions, "
                         f"e.g. --set data.references.{split}=runs/ensemble_meld/references/train_references.parquet)")
    refs = read_references(cfg.data.references[split], labels) if cfg.prompt.references else None
    enc = DialogueEncoder(tokenizer, labels, cfg.prompt, weights)
    segments = [s for d in dialogues for s in enc.segments(d, refs, train=True)]
    return segments, enc, weights


def set_phase_lrs(optimizer, cfg: FinetuneConfig, step: int, names: list[str]) -> int:
    """Learning rates for ``step``: linear warm-up, then constant; LoRA frozen (lr 0) in coarse-to-fine phase 1.

    Returns:
        the phase (1 or 2; always 2 outside coarse-to-fine).
    """
    t = cfg.train
    phase = 1 if t.mode == "coarse_to_fine" and step < t.phase1_steps else 2
    warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
    for group, name in zip(optimizer.param_groups, names):
        base = t.projector_lr if name == "projector" else t.lr
        group["lr"] = 0.0 if (name == "lora" and phase == 1) else base * warm
    return phase


def train_step(engine, batches: list[dict]) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the mean loss."""
    total = 0.0
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(batch)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += float(loss.detach())
    return total / len(batches)


def micro_batches(examples: list, order: list[int], step: int, micro: int, accum: int, rank: int, world: int) -> list[list]:
    """The examples of ``step`` for this rank: a pure function of the step, so a resumed run continues exactly."""
    per_step = micro * accum * world
    n = len(order)
    start = step * per_step
    idx = [order[(start + j) % n] for j in range(per_step)]
    mine = idx[rank * micro * accum : (rank + 1) * micro * accum]
    return [[examples[i] for i in mine[k * micro : (k + 1) * micro]] for k in range(accum)]


def fix_cuda_arch_env() -> None:
    """DeepSpeed's op builder reads TORCH_CUDA_ARCH_LIST as numbers; CUDA images that set '9.0a' break it: use '9.0'."""
    v = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if v and re.search(r"\d[a-zA-Z]", v):
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", v)


@dataclass
class TrainingSetup:
    """What a training process needs before ``deepspeed.initialize``: the job and ``jobs/gpu_check.py`` share it."""

    model: torch.nn.Module
    tok: object
    examples: list
    shots: list
    weights: dict
    labels: tuple[str, ...]
    collate: Collator
    names: list[str]
    params: list[dict]
    ds_cfg: dict
    client_opt: torch.optim.Optimizer | None

    def initialize(self):
        """``deepspeed.initialize`` on this setup: (engine, optimizer). The client optimizer when there is one,
        else DeepSpeed builds its own from the parameter groups."""
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.client_opt, config=self.ds_cfg,
                                                       model_parameters=None if self.client_opt else self.params)
        return engine, optimizer


def fit_projector_scaling(cfg: FinetuneConfig, model) -> dict[str, dict]:
    """Fit each projector's robust feature statistics on the train split's present features (the same
    numbers every later load applies: they are buffers in ``projectors.safetensors``)."""
    from mer_ray.features.scaling import fit_present

    mods = {m: p.feature for m, p in cfg.model.projectors.items()}
    if not mods:
        return {}
    train = load_dialogues(cfg.data, cfg.data.train_split, mods)
    out = {}
    for m, proj in model.projectors.items():
        out[m] = fit_present([f[m] for d in train for f in d.feats if m in f], proj.in_dim)
        proj.norm.set_stats(out[m])
    return out


def setup_training(cfg: FinetuneConfig, world: int) -> TrainingSetup:
    """Model (projectors, LoRA per mode), training examples, collator, parameter groups, DeepSpeed config and
    the client optimizer (``torch.optim.AdamW`` unless the DeepSpeed config names its own optimizer)."""
    if cfg.train.mode == "projector":
        cfg.model.lora = None
    model, tok = build_mllm(cfg.model)
    set_trainable(model)
    fit_projector_scaling(cfg, model)
    labels = model_labels(cfg)
    if cfg.prompt.template == "farcer-dialogue-v1":
        examples, collate, weights = make_segments(cfg, cfg.data.train_split, tok)
        shots = []
    else:
        examples, _, shots, weights = make_examples(cfg, cfg.data.train_split)
        collate = Collator(tok, labels, weights, cfg.prompt.max_tokens, reasoning_weight=cfg.prompt.reasoning_weight)
    groups = trainable_groups(model)
    names = list(groups)
    params = [{"params": groups[n], "lr": cfg.train.projector_lr if n == "projector" else cfg.train.lr,
               "weight_decay": cfg.train.weight_decay} for n in names]
    ds_cfg = deepspeed_config(cfg, world)
    client_opt = None if "optimizer" in ds_cfg else torch.optim.AdamW(params)
    return TrainingSetup(model, tok, examples, shots, weights, labels, collate, names, params, ds_cfg, client_opt)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: build the model, DeepSpeed, resume if a checkpoint exists, train, report."""
    fix_cuda_arch_env()  # before DeepSpeed is imported (in TrainingSetup.initialize)
    import ray.train

    cfg = FinetuneConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    t0 = time.time()
    ts = setup_training(cfg, world)
    model, examples, shots, weights, labels, collate, names = ts.model, ts.examples, ts.shots, ts.weights, ts.labels, ts.collate, ts.names
    engine, optimizer = ts.initialize()
    start, done_s = 0, 0.0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
            prog = json.loads((Path(d) / "progress.json").read_text())
            start, done_s = prog["step"], prog["train_seconds"]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    per_step = cfg.train.micro_batch * cfg.train.grad_accum * world
    max_steps = math.ceil(cfg.train.epochs * len(examples) / per_step) if cfg.train.epochs else cfg.train.max_steps
    startup_s = time.time() - t0
    t_train = last_ckpt = time.time()
    step, stop = start, False
    if rank == 0:
        print(f"[finetune] {len(examples)} training examples, {max_steps} steps of {per_step}; resuming at step {start}", flush=True)
    while step < max_steps and not stop:
        phase = set_phase_lrs(optimizer, cfg, step, names)
        # dropout and the collator's draws are seeded per step, so a run resumed from a checkpoint at step k replays
        # step k+1 onwards exactly as an uninterrupted run (one seed at start left the RNG elsewhere after a resume)
        torch.manual_seed(cfg.train.seed * 100_003 + step)
        batches = [collate(mb, train=True) for mb in micro_batches(examples, order, step, cfg.train.micro_batch, cfg.train.grad_accum, rank, world)]
        t_step = time.time()
        loss = train_step(engine, batches)
        time.sleep(max(0.0, cfg.train.min_step_seconds - (time.time() - t_step)))
        step += 1
        elapsed = done_s + time.time() - t_train
        stop = _agree(cfg.train.time_budget_min is not None and elapsed > 60 * cfg.train.time_budget_min, engine.device)
        metrics = {"step": step, "max_steps": max_steps, "loss": loss, "phase": phase, "train_seconds": elapsed,
                   "startup_seconds": startup_s, "resumed_from": start, "epoch": step * per_step / len(examples)}
        last = step >= max_steps or stop
        every_min = cfg.train.checkpoint_every_min
        due = step % cfg.train.checkpoint_every == 0 or _agree(every_min is not None and time.time() - last_ckpt > 60 * every_min, engine.device)
        if last:
            _report_final(engine, model, cfg, metrics, shots, weights, labels, rank)
        elif due:
            _report_checkpoint(engine, metrics, rank)
            last_ckpt = time.time()
        else:
            ray.train.report(metrics)
        if rank == 0 and (step % 10 == 0 or last or due):  # a line a person can read, beside Ray's own log
            eta = (time.time() - t_train) / max(1, step - start) * (max_steps - step)
            print(f"[finetune] step {step}/{max_steps} epoch {metrics['epoch']:.2f} loss {loss:.4f} "
                  f"{elapsed / 60:.1f} min trained, ~{eta / 60:.1f} min left{' (checkpoint)' if due and not last else ''}", flush=True)
        if cfg.train.pid_file and rank == 0:  # lets the fault-tolerance test find (and kill) a live worker
            Path(cfg.train.pid_file).write_text(json.dumps({"pid": os.getpid(), "step": step}))


def model_labels(cfg: FinetuneConfig) -> tuple[str, ...]:
    from mer_ray.data.labels import get_label_set

    return get_label_set(cfg.model.label_set).labels


def _agree(flag: bool, device) -> bool:
    """All ranks stop together: any rank over budget stops everyone."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _report_checkpoint(engine, metrics: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds")  # every rank writes its own ZeRO partition
        if rank == 0:
            (Path(d) / "progress.json").write_text(json.dumps({"step": metrics["step"], "train_seconds": metrics["train_seconds"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _report_final(engine, model, cfg: FinetuneConfig, metrics: dict, shots, weights, labels, rank: int) -> None:
    import ray.train

    # ZeRO-3 holds each parameter in pieces: gather the 16-bit weights (a collective, every rank calls it).
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = model.state_dict()
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            meta = {**artifact_meta(cfg, shots, weights, labels, metrics),
                    "feature_scaling": {m: p.norm.stats() for m, p in model.projectors.items()}}
            save_artifacts(Path(d) / "export", state, model, meta)
            (Path(d) / "progress.json").write_text(json.dumps({"step": metrics["step"], "train_seconds": metrics["train_seconds"], "done": True}))
        ray.train.report({**metrics, "final": True}, checkpoint=ray.train.Checkpoint.from_directory(d))


def artifact_meta(cfg: FinetuneConfig, shots, weights, labels, metrics: dict | None = None) -> dict:
    """The JSON written beside the adapter: what is needed to rebuild prompts and label scoring."""
    return {
        "format": "mer-mllm/1",
        "template_version": cfg.prompt.template if cfg.prompt.template != "farcer-v1" else TEMPLATE_VERSION,
        "base_model": cfg.model.base,
        "label_set": cfg.model.label_set,
        "labels": list(labels),
        "model": cfg.model.model_dump(),
        "prompt": cfg.prompt.model_dump(),
        "shots": [list(s) for s in shots],
        "class_weights": weights,
        "train": {"mode": cfg.train.mode, **({k: metrics[k] for k in ("step", "loss", "train_seconds")} if metrics else {})},
        "deepspeed": cfg.deepspeed,
    }


def run_finetune(cfg: FinetuneConfig, out: str | Path | None = None) -> dict:
    """Run the TorchTrainer, copy ``export/`` of the final checkpoint to ``out``; returns a summary dict.

    Call with Ray already initialised (a local instance, or the cluster a job runs on).
    """
    import shutil

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out or cfg.out)
    r = cfg.ray
    name = r.name or f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # fresh per run: a reused name resumes
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(int(r.cpus_per_worker))}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}),
        torch_config=TorchConfig(backend=r.backend or ("nccl" if r.use_gpu else "gloo")),
        run_config=RunConfig(name=name, storage_path=str(Path(r.storage_path).expanduser().resolve()) if r.storage_path else None,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), worker_runtime_env={"env_vars": env}),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / "export").exists():
            raise RuntimeError(f"final checkpoint of {name} has no export/ (did training finish?)")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(d) / "export", out)
    summary = {"run_name": name, "out": str(out), "wall_seconds": time.time() - t0, "metrics": result.metrics,
               "checkpoint": result.checkpoint.path}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["run_finetune", "train_loop_per_worker", "train_step", "micro_batches", "set_phase_lrs", "make_examples"]
