"""`mer finetune`, `mer predict llm`, `mer bench train`: the multimodal LLM fine-tuning area."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer()
predict_app = typer.Typer()


@app.command("finetune")
def finetune(
    config: Path = typer.Option(..., help="A jobs/finetune_*.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set train.max_steps=5 (repeatable)."),
    address: str | None = typer.Option(None, help="Ray address to attach to (default: the config's ray.address, else a new local instance)."),
    eval_only: Path | None = typer.Option(None, help="Skip training: evaluate this fine-tuned directory (and the baselines)."),
    no_eval: bool = typer.Option(False, help="Skip the evaluation after training."),
    adapter_name: str | None = typer.Option(None, help="Also install the result as adapter NAME of --models "
                                            "(<models>/mllm/adapters/NAME/), served by name on one endpoint."),
    models: Path | None = typer.Option(None, help="An existing models directory (with --adapter-name)."),
    overwrite: bool = typer.Option(False, help="Replace an adapter of the same name."),
):
    """Fine-tune the LLM + projectors with Ray Train + DeepSpeed, then evaluate on eval.splits (out/eval.json, out/eval.png)."""
    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig

    cfg = load(FinetuneConfig, config, set_)
    if adapter_name is not None:  # checked before hours of training, not after
        from mer_ray.mllm.adapters import adapters_root, check_name

        check_name(adapter_name)
        if models is None or not models.is_dir():
            raise typer.BadParameter(f"--adapter-name needs --models, an existing models directory (got {models})")
        if (adapters_root(models) / adapter_name).exists() and not overwrite:
            raise typer.BadParameter(f"adapter {adapter_name!r} exists in {models}; pass --overwrite to replace it")
    res: dict = {}
    if eval_only is None:
        import ray

        from mer_ray.mllm.train import run_finetune
        from mer_ray.runtime import start_ray

        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1  # + the train controller
        start_ray(int(need + 0.999), address=address or cfg.ray.address)
        try:
            summary = run_finetune(cfg)
        finally:
            ray.shutdown()
        typer.echo(json.dumps({k: summary[k] for k in ("run_name", "out", "wall_seconds")}))
        typer.echo(json.dumps({k: summary["metrics"].get(k) for k in ("step", "loss", "train_seconds", "startup_seconds", "resumed_from")}))
    if cfg.eval.splits and not no_eval:
        from mer_ray.mllm.evaluate import run_eval

        art = eval_only or Path(cfg.out)
        out_dir = Path(cfg.out)
        res = run_eval(cfg, art, out_dir / "eval.json", device=cfg.eval.resolved_device())
        _plot(res, out_dir / "eval.png")
        typer.echo(json.dumps(_headline(res), indent=1))
    if adapter_name is not None:
        from mer_ray.mllm.adapters import install_adapter

        dest = install_adapter(eval_only or Path(cfg.out), models, adapter_name, overwrite=overwrite)
        typer.echo(f"adapter {adapter_name!r} installed at {dest} (serve it: mer serve --models {models})")


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
    meld_dir: Path | None = typer.Option(None, help="MELD CSV directory."),
    split: str = typer.Option("test", help="MELD split, or the split name recorded for --manifest."),
    manifest: Path | None = typer.Option(None, help="A CSV/JSONL/Parquet manifest instead of MELD."),
    features: Path | None = typer.Option(None, help="Feature store (Parquet directory) for the projectors."),
    subset: int | None = typer.Option(None, help="Score a stratified seeded subset of this many utterances."),
    max_dialogues: int | None = typer.Option(None, help="Keep this many dialogues (seeded sample)."),
    seed: int = typer.Option(0, help="Seed of --subset / --max-dialogues."),
    base: str | None = typer.Option(None, help="Override the base model recorded in the directory."),
    batch_size: int = typer.Option(4, help="Prompts per forward pass."),
    references: Path | None = typer.Option(None, help="Vanilla predictions of the split (Parquet file or dir), for a model trained with prompt.references."),
):
    """Label distributions from a fine-tuned LLM (no Ray, no DeepSpeed)."""
    import pyarrow.parquet as pq

    from mer_ray.mllm.examples import DataConfig, load_dialogues, stratified_keys
    from mer_ray.mllm.predict import MLLMPredictor, predict_table

    if (meld_dir is None) == (manifest is None):
        raise typer.BadParameter("give exactly one of --meld-dir and --manifest")
    pred = MLLMPredictor.from_dir(model, base=base, batch_size=batch_size)
    data = DataConfig(meld_dir=str(meld_dir) if meld_dir else None, manifests={split: str(manifest)} if manifest else {},
                      features=str(features) if features else None, max_dialogues={split: max_dialogues} if max_dialogues else {}, seed=seed)
    mods = _modalities(model)
    dialogues = load_dialogues(data, split, mods if features else {})
    keys = stratified_keys(dialogues, subset, seed) if subset else None
    refs = None
    if pred.prompt.references:
        from mer_ray.mllm.dialogue import read_references

        if references is None:
            raise typer.BadParameter("this model reads vanilla references: give --references (mer predict vanilla's output for the split)")
        refs = read_references(references, pred.labels)
    table = predict_table(pred, dialogues, split, keys, refs)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    typer.echo(json.dumps({"out": str(out), "rows": table.num_rows, "labels": list(pred.labels)}))


def _modalities(model_dir: Path) -> dict[str, str]:
    from mer_ray.mllm.artifacts import read_meta

    meta = read_meta(model_dir)
    return {m: p["feature"] for m, p in meta["model"]["projectors"].items()}
