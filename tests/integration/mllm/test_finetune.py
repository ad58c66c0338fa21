"""Fine-tuning job: shipped configs, pure training helpers, fault tolerance on a real local Ray,
and the CPU config submitted with `ray job submit` to a real `ray start --head`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "jobs").glob("finetune_*.yaml"))


def _entry():
    spec = importlib.util.spec_from_file_location("jobs_finetune", REPO / "jobs" / "finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_parses_and_names_its_command(path):
    from mer_ray.config import load
    from mer_ray.mllm.config import deepspeed_config

    cfg = load(_entry().CONFIG, path)
    header = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    cmd = next(ln for ln in header if "ray job submit" in ln)
    argv = shlex.split(cmd.split("ray job submit", 1)[1])
    script = argv[argv.index("--") + 1 :]
    assert script[:2] == ["python", "jobs/finetune.py"] and (REPO / script[1]).is_file()
    assert script[script.index("--config") + 1] == f"jobs/{path.name}"
    ds = deepspeed_config(cfg, world=4)
    t = cfg.train
    assert ds["train_batch_size"] == t.micro_batch * t.grad_accum * 4
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert "auto" not in json.dumps(ds)


def test_readme_gives_the_cpu_job_as_one_ray_job_submit_line():
    """The README's CPU job is one complete line starting with ``ray job submit``, the same as the config's header."""
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()]
    readme = [ln for ln in lines if ln.startswith("ray job submit") and "jobs/finetune_cpu.yaml" in ln]
    assert len(readme) == 1, readme
    header = next(ln for ln in (REPO / "jobs" / "finetune_cpu.yaml").read_text().splitlines()
                  if ln.startswith("#") and "ray job submit" in ln)
    assert shlex.split(readme[0].split("ray job submit", 1)[1]) == shlex.split(header.split("ray job submit", 1)[1])


def test_config_errors_name_the_problem(tmp_path):
    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {mode: coarse_to_fine, phase1_steps: 0}\nmodel: {projectors: {}}\n")
    with pytest.raises(ValueError, match="phase1_steps"):
        load(FinetuneConfig, bad)
    bad.write_text("train: {max_stepz: 3}\n")
    with pytest.raises(ValueError, match="max_stepz"):
        load(FinetuneConfig, bad)
    with pytest.raises(ValueError, match="DeepSpeed config .nope.json. not found"):
        load(FinetuneConfig, CONFIGS[0], ["deepspeed=nope.json"])
    assert load(FinetuneConfig, CONFIGS[0], ["train.max_steps=3"]).train.max_steps == 3


def test_coarse_to_fine_freezes_lora_in_phase_one():
    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.train import set_phase_lrs

    cfg = load(FinetuneConfig, CONFIGS[0], ["train.mode=coarse_to_fine", "train.phase1_steps=3", "train.max_steps=6", "train.warmup_steps=0"])
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
    assert set_phase_lrs(opt, cfg, 0, ["projector", "lora"]) == 1
    assert opt.param_groups[0]["lr"] == cfg.train.projector_lr and opt.param_groups[1]["lr"] == 0.0
    assert set_phase_lrs(opt, cfg, 3, ["projector", "lora"]) == 2
    assert opt.param_groups[1]["lr"] == cfg.train.lr


def test_micro_batches_are_a_pure_function_of_step():
    from mer_ray.mllm.train import micro_batches

    ex = list(range(10))
    order = list(np.random.default_rng(0).permutation(10))
    r0 = micro_batches(ex, order, 3, micro=2, accum=2, rank=0, world=2)
    r1 = micro_batches(ex, order, 3, micro=2, accum=2, rank=1, world=2)
    assert r0 == micro_batches(ex, order, 3, micro=2, accum=2, rank=0, world=2)
    assert len(r0) == 2 and all(len(b) == 2 for b in r0)
    assert not set(sum(r0, [])) & set(sum(r1, []))  # ranks see different examples in a step


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from mer_ray.mllm.tiny import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tinyft") / "gemma3")


@pytest.mark.slow
@pytest.mark.ray
def test_killed_worker_resumes_from_checkpoint_and_finishes(ray_local, tiny_base, meld_dir, tmp_path):
    """ZeRO-3 over 2 workers, coarse-to-fine: SIGKILL rank 0 mid-run; the group restarts from the last checkpoint."""
    from mer_ray.bench.chaos_cluster import kill_when_step
    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.predict import MLLMPredictor
    from mer_ray.mllm.train import run_finetune

    pid_file = tmp_path / "pid.json"
    cfg = load(FinetuneConfig, CONFIGS[0], [
        f"model.base={tiny_base}", f"data.meld_dir={meld_dir}", "data.max_dialogues={train: 3}", "deepspeed=zero3_cpu.json",
        "train.mode=coarse_to_fine", "train.phase1_steps=3", "train.max_steps=8", "train.checkpoint_every=2", "train.warmup_steps=0",
        "train.min_step_seconds=0.7", f"train.pid_file={pid_file}", "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.max_failures=1",
        f"ray.storage_path={tmp_path / 'ray_results'}", f"out={tmp_path / 'out'}"])
    th = kill_when_step(pid_file, 3)  # SIGKILL rank 0 once it reports step 3
    summary = run_finetune(cfg)
    th.join(timeout=1)
    killed = th.killed
    assert killed, "the worker was never killed"
    m = summary["metrics"]
    assert m["step"] == 8 and m["final"]
    assert 2 <= m["resumed_from"] <= killed["step"] and m["resumed_from"] % 2 == 0  # from a checkpoint, not from scratch
    pred = MLLMPredictor.from_dir(tmp_path / "out")
    out = pred.predict_dialogue([{"speaker": "A", "text": "I can't believe it!"}])
    # float32 softmax over 7 labels: |sum - 1| <= ~10 * 2**-24 < 1e-6
    assert out["emotion_probs"].shape == (1, 7) and abs(out["emotion_probs"].sum() - 1) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    """Stop exactly the Ray processes of this head (their command lines name its temp dir), never `ray stop`."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_cpu_config_then_predict(meld_dir, tmp_path):
    """`ray start --head`, `ray job submit` the CPU config (real Gemma 3 270M) on a MELD subset with features, `mer predict llm`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mer_ray.data.loaders import load_meld

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Features for the subset, through the extract stage's contract (MELD has no media here: face/audio are null).
    train = load_meld(meld_dir, "train")
    ids = sorted(set(train.column("dialogue_id").to_pylist()))[:3]
    sub = train.filter(pa.compute.is_in(train.column("dialogue_id"), pa.array(ids)))
    feats = tmp_path / "features"
    code = ("import sys, pyarrow.parquet as pq; from mer_ray.features.job import run_extract; "
            "from mer_ray.runtime import start_ray; start_ray(2, log_to_driver=False); "
            "print(run_extract(pq.read_table(sys.argv[1]), sys.argv[2], media_root=sys.argv[3], progress=False))")
    pq.write_table(sub, tmp_path / "sub.parquet")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub.parquet"), str(feats), str(tmp_path)], env=env, check=True, timeout=400)
    temp_dir = f"/tmp/mer-ft-{os.getpid()}-{int(time.time())}"
    port, dash = _free_port(), _free_port()
    # Own agent ports too: the default agent listen port (52365) is taken when another local Ray
    # (the session's `ray_local`) is up, and the head's job agent then never registers.
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}"]
    head = ["ray", "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=3", *agent_ports,
            f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--include-dashboard=true", "--disable-usage-stats"]
    out_dir = tmp_path / "ft"
    try:
        subprocess.run([str(bin_dir / "ray"), *head[1:]], env=env, check=True, timeout=180, capture_output=True)
        sets = [f"data.meld_dir={meld_dir}", f"data.features={feats}", "data.max_dialogues={train: 3}", "train.max_steps=2",
                "train.checkpoint_every=1", "train.warmup_steps=1", "ray.cpus_per_worker=1", "eval.splits=[]", f"out={out_dir}",
                f"ray.storage_path={tmp_path / 'ray_results'}"]
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                  "--", "python", "jobs/finetune.py", "--config", "jobs/finetune_cpu.yaml", *[a for s in sets for a in ("--set", s)]]
        # The head's job agent registers some seconds after `ray start` returns (over a minute was
        # seen on a busy 2-core machine): retry only that error, for up to five minutes.
        for _ in range(60):
            job = subprocess.run(submit, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=900)
            log = job.stdout + job.stderr
            if "No available agent" not in log:
                break
            time.sleep(5)
        assert job.returncode == 0, log[-4000:]
        assert re.search(r"Job '[^']+' succeeded", log), log[-4000:]
        assert "TRAINED" in log
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert (out_dir / "adapter" / "adapter_model.safetensors").exists() and (out_dir / "mer_mllm.json").exists()
    pred_out = tmp_path / "pred.parquet"
    subprocess.run([str(bin_dir / "mer"), "predict", "llm", "--model", str(out_dir), "--meld-dir", str(meld_dir), "--split", "dev",
                    "--max-dialogues", "1", "--features", str(feats), "--out", str(pred_out)], env=env, check=True, timeout=400)
    t = pq.read_table(pred_out)
    labels = json.loads(t.schema.metadata[b"emotion_labels"])
    assert labels == ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    assert not {"label", "sentiment"} & set(t.column_names)  # prediction files carry no gold
    probs = np.array(t.column("emotion_probs").to_pylist())
    assert probs.shape == (t.num_rows, 7) and t.num_rows > 0
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)  # float32 softmax rows, stored as float32: < 1e-6
    assert (probs >= 0).all()


@pytest.mark.slow
@pytest.mark.ray
def test_dialogue_template_trains_checkpoints_by_time_and_a_rerun_resumes_after_the_driver_died(ray_local, meld_dir, tmp_path):
    """farcer-dialogue-v1 on Ray Train: checkpoints at least every `checkpoint_every_min`; a first run whose worker is
    killed with no retries left fails; the same command again (same run name) resumes from its last checkpoint."""
    from mer_ray.bench.chaos_cluster import kill_when_step
    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.predict import MLLMPredictor
    from mer_ray.mllm.tiny import build_tiny_lm
    from mer_ray.mllm.train import run_finetune

    labels = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
    base = build_tiny_lm(tmp_path / "tiny", "gemma3", single_token_words=labels)
    pid_file = tmp_path / "pid.json"
    sets = [f"model.base={base}", f"data.meld_dir={meld_dir}", "data.max_dialogues={train: 8}",  # epochs: 1 -> 8 steps
            "train.checkpoint_every=1000", "train.checkpoint_every_min=0.004", "train.min_step_seconds=0.5",
            "train.warmup_steps=0", "train.grad_accum=1", f"train.pid_file={pid_file}", "ray.max_failures=0", "ray.cpus_per_worker=1",
            "ray.name=dialogue_resume", f"ray.storage_path={tmp_path / 'ray_results'}", f"out={tmp_path / 'out'}"]
    cfg = load(FinetuneConfig, REPO / "jobs" / "finetune_farcer_meld.yaml", sets)

    th = kill_when_step(pid_file, 4)
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's error type differs across versions; what matters is the rerun
        run_finetune(cfg)
    th.join(timeout=1)
    pid_file.unlink()
    summary = run_finetune(load(FinetuneConfig, REPO / "jobs" / "finetune_farcer_meld.yaml", [x for x in sets if not x.startswith("train.pid_file")]))
    m = summary["metrics"]
    assert m["step"] == 8 and m["final"]
    assert 3 <= m["resumed_from"] <= 5, m  # from the time-based checkpoint before the kill, not from scratch
    pred = MLLMPredictor.from_dir(tmp_path / "out")
    assert pred.prompt.template == "farcer-dialogue-v1"
    out = pred.predict_dialogue([{"speaker": "A", "text": "so what"}, {"speaker": "B", "text": "okay"}])
    assert out["emotion_probs"].shape == (2, 7) and np.allclose(out["emotion_probs"].sum(1), 1, atol=1e-5)
