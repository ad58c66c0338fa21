"""``train_vanilla_worker`` and ``train_llm_worker``: SIGKILL a Ray Train worker mid-run; it resumes from its
last checkpoint (``FailureConfig``) to the same model."""

from __future__ import annotations

import time
from pathlib import Path

from mer_ray.bench.chaos_cluster import Injector, ResumeWatch, compare_ids, kill_pid, read_progress_file

#: Dev metrics compared exactly between an uninterrupted run and a killed-and-resumed one. Resuming
#: restores weights, optimiser and scheduler from the last epoch checkpoint; each epoch reseeds torch
#: (dropout) and numpy (the batch order) from ``seed * 1000 + epoch``, so the redone epoch sees the same
#: batches in the same order through the same float ops (one thread, same CPU): bit for bit.
VANILLA_METRICS = ("train_loss", "dev_weighted_f1", "dev_accuracy", "dev_macro_f1")


def _vanilla_store(work_dir: Path, n_dialogues: int) -> Path:
    from mer_ray.demo.corpus import make_corpus
    from mer_ray.features.job import run_extract

    store = work_dir / "features"
    if not (store / "_summary.json").exists():
        manifest = make_corpus(work_dir / "corpus", n_dialogues=n_dialogues, seed=1)
        run_extract(manifest, store, config={"media": False}, progress=False)
    return store


def _last_weights(run_dir: Path) -> dict:
    import torch

    from mer_ray.vanilla import artifacts

    states = artifacts.checkpoint_states(run_dir)
    last = max(states, key=lambda t: t[1]["epoch"])[0]
    return torch.load(last / artifacts.MODEL_FILE)


def run_vanilla_scenario(work_dir: str | Path, epochs: int = 6, n_dialogues: int = 60) -> dict:
    """Train the vanilla model twice on Ray Train (attached cluster): clean, then with its worker SIGKILLed
    mid-epoch (epoch 3 or later of 6, between 20% and 80% of all steps), ``max_failures=2``.

    ``lost``/``duplicated`` count epochs (the ids) of the final history against the clean run's; the
    comparison of dev metrics per epoch and of the final weights is in ``metrics_equal``/``weights_equal``.
    """
    import torch

    from mer_ray.vanilla.model import VanillaConfig
    from mer_ray.vanilla.train import TrainConfig, fit

    work_dir = Path(work_dir)
    store = _vanilla_store(work_dir, n_dialogues)
    cfg = TrainConfig(model=VanillaConfig(encoder="frozen", hidden=16), epochs=epochs, batch_utterances=8, num_threads=1)
    t0 = time.time()
    clean = fit(cfg, store, work_dir / "ray_train", "clean")
    clean_s = time.time() - t0
    prog = work_dir / "progress.json"
    prog.unlink(missing_ok=True)

    def progress() -> float:
        info = read_progress_file(prog)
        return info["step"] / info["total_steps"] if info else 0.0

    def strike():
        info = read_progress_file(prog)
        # mid-epoch (second half), three epochs after the first checkpoint: Ray Train registers a reported
        # checkpoint asynchronously, and kills 0.2 s after epoch 0's report (epochs take ~0.35 s here)
        # were seen to restart from scratch
        if not info or info["epoch"] < 3 or not info["n_batches"] // 2 <= info["batch"] < info["n_batches"] - 1:
            return None
        kill_pid(info["pid"])
        back.start_watch(info["pid"])
        return f"Ray Train worker (epoch {info['epoch']}, batch {info['batch']}/{info['n_batches']})", info["pid"]

    back = ResumeWatch(prog)
    inj = Injector(progress, strike, poll_s=0.01)
    inj.start()
    t0 = time.time()
    res = fit(cfg.model_copy(update={"progress_file": str(prog)}), store, work_dir / "ray_train", "chaos", max_failures=2)
    wall = time.time() - t0
    injected = inj.finish()
    ids = compare_ids([h["epoch"] for h in clean["history"]], [h["epoch"] for h in res["history"]])
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(clean["history"], res["history"])) for k in VANILLA_METRICS}
    wa, wb = _last_weights(work_dir / "ray_train" / "clean"), _last_weights(work_dir / "ray_train" / "chaos")
    resumed = [h["epoch"] for h in res["history"] if h["resumed_run"]]
    return {"injected": injected, **{k: ids[k] for k in ("expected", "observed", "lost", "duplicated")}, "failed_requests": {},
            "recovery_s": back.seconds(), "recovery_note": "from the kill to the first step of the restarted worker",
            "extra_wall_s": round(wall - clean_s, 3),
            "resumed_epochs": resumed, "metric_diff": diffs, "metrics_equal": all(v == 0 for v in diffs.values()),
            "weights_equal": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
            "dev_weighted_f1": {"clean": clean["history"][-1]["dev_weighted_f1"], "observed": res["history"][-1]["dev_weighted_f1"]},
            "wall_s": round(wall, 2), "clean_wall_s": round(clean_s, 2), "tolerance": 0.0}


# ---------------------------------------------------------------- LLM fine-tuning: kill a rank

def run_llm_scenario(work_dir: str | Path, meld_dir: str | Path, max_steps: int = 8,
                     config: str | Path = "jobs/finetune_cpu.yaml") -> dict:
    """The tiny Gemma-3-shaped LM fine-tuned with DeepSpeed ZeRO-3 over 2 Ray Train workers (gloo), clean and
    with rank 0 SIGKILLed between 20% and 80% of the steps (``max_failures=1``, checkpoints every 2 steps).

    ``lost``/``duplicated`` compare the steps (ids) of the two runs' final step; ``prob_diff`` is the largest
    difference of the final models' label probabilities on three dialogues.
    """
    import numpy as np

    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.predict import MLLMPredictor
    from mer_ray.mllm.tiny import build_tiny_lm
    from mer_ray.mllm.train import run_finetune

    work_dir = Path(work_dir)
    base = build_tiny_lm(work_dir / "tiny" / "gemma3")
    cfg_file = Path(config)  # a shipped finetune config (default relative to the repository root)
    pid_file = work_dir / "pid.json"

    def cfg(name: str, extra: list[str]) -> FinetuneConfig:
        return load(FinetuneConfig, cfg_file, [
            f"model.base={base}", f"data.meld_dir={meld_dir}", "data.max_dialogues={train: 3}", "deepspeed=zero3_cpu.json",
            f"train.max_steps={max_steps}", "train.checkpoint_every=2", "train.warmup_steps=0", "train.min_step_seconds=0.7",
            "ray.num_workers=2", "ray.cpus_per_worker=1", f"ray.name={name}", f"ray.storage_path={work_dir / 'ray_results'}",
            f"out={work_dir / name}", *extra])

    t0 = time.time()
    clean = run_finetune(cfg("clean", ["ray.max_failures=0"]))
    clean_s = time.time() - t0
    back = ResumeWatch(pid_file)

    def progress() -> float:
        info = read_progress_file(pid_file)
        return info["step"] / max_steps if info else 0.0

    def strike():
        info = read_progress_file(pid_file)
        if not info:
            return None
        kill_pid(info["pid"])
        back.start_watch(info["pid"])
        return f"Ray Train rank 0 (step {info['step']}/{max_steps})", info["pid"]

    # strike at step 3 of 8, after the step-2 checkpoint is committed and before the next: a kill on a checkpoint
    # step can land before every rank has reported it, and the run then restarts from step 0, proving nothing
    inj = Injector(progress, strike, lo=0.3, hi=0.75)
    inj.start()
    t0 = time.time()
    res = run_finetune(cfg("chaos", ["ray.max_failures=1", f"train.pid_file={pid_file}"]))
    wall = time.time() - t0
    injected = inj.finish()
    dialogues = [[{"speaker": "A", "text": "I can't believe it!"}, {"speaker": "B", "text": "so what"}],
                 [{"speaker": "A", "text": "okay"}], [{"speaker": "B", "text": "get out of here"}, {"speaker": "A", "text": "fine"}]]
    pa_, pb = MLLMPredictor.from_dir(work_dir / "clean"), MLLMPredictor.from_dir(work_dir / "chaos")
    diff = max(float(np.max(np.abs(pa_.predict_dialogue(d)["emotion_probs"] - pb.predict_dialogue(d)["emotion_probs"]))) for d in dialogues)
    m, mc = res["metrics"], clean["metrics"]
    ids = compare_ids(list(range(1, mc["step"] + 1)), list(range(1, m["step"] + 1)))
    return {"injected": injected, **{k: ids[k] for k in ("expected", "observed", "lost", "duplicated")}, "failed_requests": {},
            "recovery_s": back.seconds(), "recovery_note": "from the kill to the first step reported by the restarted rank 0",
            "resumed_from": m.get("resumed_from"), "final_loss": {"clean": mc["loss"], "observed": m["loss"]},
            "loss_diff": abs(mc["loss"] - m["loss"]), "prob_diff": diff, "wall_s": round(wall, 2), "clean_wall_s": round(clean_s, 2)}

