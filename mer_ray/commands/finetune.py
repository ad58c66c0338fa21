"""`mer finetune`, `mer predict llm`, `mer bench train`: the multimodal LLM fine-tuning area."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mer_ray.cli import app, bench_app, lantern_app, predict_app  # noqa: F401


@app.command("finetune")
def finetune(
    config: Path = typer.Option(..., help="A jobs/finetune_*.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set train.max_steps=5 (repeatable)."),
    address: Optional[str] = typer.Option(None, help="Ray address to attach to (default: the config's ray.address, else a new local instance)."),
    eval_only: Optional[Path] = typer.Option(None, help="Skip training: evaluate this fine-tuned directory (and the baselines)."),
    no_eval: bool = typer.Option(False, help="Skip the evaluation after training."),
):
    """Fine-tune the LLM + projectors with Ray Train + DeepSpeed, then evaluate on eval.splits (out/eval.json, out/eval.png)."""
    from mer_ray.train.mllm_config import load_config

    cfg = load_config(config, set_)
    res: dict = {}
    if eval_only is None:
        import ray

        from mer_ray.train.mllm import run_finetune

        addr = address or cfg.ray.address
        if addr:
            ray.init(address=addr)
        else:
            need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1  # + the train controller
            ray.init(address="local", num_cpus=int(need + 0.999), include_dashboard=False, object_store_memory=2 * 10**8,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
        try:
            summary = run_finetune(cfg)
        finally:
            ray.shutdown()
        typer.echo(json.dumps({k: summary[k] for k in ("run_name", "out", "wall_seconds")}))
        typer.echo(json.dumps({k: summary["metrics"].get(k) for k in ("step", "loss", "train_seconds", "startup_seconds", "resumed_from")}))
    if cfg.eval.splits and not no_eval:
        from mer_ray.train.mllm_eval import run_eval

        art = eval_only or Path(cfg.out)
        out_dir = Path(cfg.out)
        res = run_eval(cfg, art, out_dir / "eval.json", device=cfg.eval.resolved_device())
        _plot(res, out_dir / "eval.png")
        typer.echo(json.dumps(_headline(res), indent=1))


def _headline(res: dict) -> dict:
    head = {"subset": res["subset"], "subset_seed": res["subset_seed"]}
    for split in res["splits"]:
        if split in res["finetuned"]:
            head[f"finetuned/{split}"] = {k: round(res["finetuned"][split][k], 2) for k in ("weighted_f1", "accuracy")}
        b = res["baseline"].get(f"{res['baseline'].get('chosen_shots')}-shot", {})
        if split in b:
            head[f"baseline-{res['baseline']['chosen_shots']}shot/{split}"] = {k: round(b[split][k], 2) for k in ("weighted_f1", "accuracy")}
    return head


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = {k: v for k, v in _headline(res).items() if isinstance(v, dict)}
    if not head:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(head), 3.2))
    xs = range(len(head))
    ax.bar([x - 0.2 for x in xs], [v["weighted_f1"] for v in head.values()], 0.4, label="weighted F1")
    ax.bar([x + 0.2 for x in xs], [v["accuracy"] for v in head.values()], 0.4, label="accuracy")
    ax.set_xticks(list(xs), [k.replace("/", "\n") for k in head], fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"{res['base_model']}: fine-tuned vs untrained (n={res['subset']}, seed {res['subset_seed']})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@predict_app.command("llm")
def predict_llm(
    model: Path = typer.Option(..., help="A fine-tuned directory (adapter/, projectors.safetensors, mer_mllm.json)."),
    out: Path = typer.Option(..., help="Output Parquet: one row per utterance, emotion_probs + emotion_pred, no gold columns."),
    meld_dir: Optional[Path] = typer.Option(None, help="MELD CSV directory."),
    split: str = typer.Option("test", help="MELD split, or the split name recorded for --manifest."),
    manifest: Optional[Path] = typer.Option(None, help="A CSV/JSONL/Parquet manifest instead of MELD."),
    features: Optional[Path] = typer.Option(None, help="Feature store (Parquet directory) for the projectors."),
    subset: Optional[int] = typer.Option(None, help="Score a stratified seeded subset of this many utterances."),
    max_dialogues: Optional[int] = typer.Option(None, help="Keep this many dialogues (seeded sample)."),
    seed: int = typer.Option(0, help="Seed of --subset / --max-dialogues."),
    base: Optional[str] = typer.Option(None, help="Override the base model recorded in the directory."),
    batch_size: int = typer.Option(4, help="Prompts per forward pass."),
):
    """Label distributions from a fine-tuned LLM (no Ray, no DeepSpeed)."""
    import pyarrow.parquet as pq

    from mer_ray.mllm_data import DataConfig, load_split, stratified_keys
    from mer_ray.mllm_predict import MLLMPredictor, predict_table

    if (meld_dir is None) == (manifest is None):
        raise typer.BadParameter("give exactly one of --meld-dir and --manifest")
    pred = MLLMPredictor.from_dir(model, base=base, batch_size=batch_size)
    data = DataConfig(meld_dir=str(meld_dir) if meld_dir else None, manifests={split: str(manifest)} if manifest else {},
                      features=str(features) if features else None, max_dialogues={split: max_dialogues} if max_dialogues else {}, seed=seed)
    mods = _modalities(model)
    dialogues = load_split(data, split, mods if features else {})
    keys = stratified_keys(dialogues, subset, seed) if subset else None
    table = predict_table(pred, dialogues, split, keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    typer.echo(json.dumps({"out": str(out), "rows": table.num_rows, "labels": list(pred.labels)}))


def _modalities(model_dir: Path) -> dict[str, str]:
    meta = json.loads((Path(model_dir) / "mer_mllm.json").read_text())
    return {m: p["feature"] for m, p in meta["model"]["projectors"].items()}


@bench_app.command("train")
def bench_train(
    out: Path = typer.Option(..., help="Output JSON."),
    steps: int = typer.Option(6, help="Timed LoRA steps (after warm-up)."),
    warmup: int = typer.Option(2, help="Untimed warm-up steps."),
    seq_len: int = typer.Option(256, help="Fixed sequence length of every batch."),
    batch: int = typer.Option(1, help="Sequences per step."),
    threads: int = typer.Option(2, help="Torch threads on both sides (Ray: the worker's CPUs and OMP_NUM_THREADS)."),
    base: str = typer.Option("gemma3-270m", help="Base LLM."),
    meld_dir: Path = typer.Option(Path("../shared/data/meld"), help="MELD CSVs that supply the batches' text."),
):
    """Plain PyTorch vs Ray Train + DeepSpeed ZeRO-2 (1 worker): the same LoRA steps on the same batches; key `overhead`."""
    from mer_ray.bench.finetune import run_bench

    res = run_bench(out, steps=steps, warmup=warmup, seq_len=seq_len, batch=batch, threads=threads, base=base, meld_dir=meld_dir)
    typer.echo(json.dumps({k: res[k] for k in ("plain_tokens_per_s", "ray_tokens_per_s", "overhead", "ray_startup_seconds")}))
