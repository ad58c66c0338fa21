"""`mer ensemble`: build the MELD ensemble (every member, the fusion, the report), resumable."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer()


@app.command("ensemble")
def ensemble(
    config: Path = typer.Option(Path("jobs/ensemble_meld.yaml"), help="An ensemble YAML (jobs/ensemble_meld.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set data_dir=DIR --set out=DIR (repeatable)."),
    address: str | None = typer.Option(None, help="Ray address to attach to (default: a new local instance)."),
):
    """Vanilla seeds -> Lantern prompts -> LLM fine-tuning -> member predictions -> fusion -> report; each stage skips
    what an earlier run finished, so rerunning the same command resumes."""
    import ray

    from mer_ray.config import load
    from mer_ray.ensemble.config import EnsembleConfig
    from mer_ray.ensemble.recipe import run_ensemble_recipe
    from mer_ray.runtime import start_ray

    cfg = load(EnsembleConfig, config, set_)
    start_ray(cfg.ray_cpus, address=address)
    try:
        report = run_ensemble_recipe(cfg)
    finally:
        ray.shutdown()
    test = report.get("test", {})
    typer.echo(json.dumps({name: round(m["weighted_f1"], 2) for name, m in test.items() if isinstance(m, dict) and "weighted_f1" in m}, indent=1))
    typer.echo(f"report: {Path(cfg.out) / 'report' / 'report.md'}")


predict_app = typer.Typer()


@predict_app.command("ensemble")
def predict_ensemble(
    models: Path = typer.Option(..., help="A `mer ensemble` run directory (runs/ensemble_meld)."),
    manifest: Path = typer.Option(..., help="The corpus: a CSV/JSONL/Parquet manifest (docs/data.md)."),
    out: Path = typer.Option(..., help="Predictions Parquet to write (the vanilla prediction contract)."),
    label_map: Path | None = typer.Option(None, help="YAML {target_label: [model labels...]}: sum, then renormalise."),
    llm: bool = typer.Option(True, "--llm/--no-llm", help="--no-llm: the vanilla seed average only."),
    lantern: bool = typer.Option(True, "--lantern/--no-lantern", help="--no-lantern: skip the Lantern prompt job (Ray)."),
    split: str | None = typer.Option(None, help="Only rows whose `split` column equals this."),
    work_dir: Path | None = typer.Option(None, help="Member predictions and the Lantern job (default: OUT.work)."),
    batch_size: int = typer.Option(4, help="FARCER prompts per forward pass."),
    ray_cpus: int = typer.Option(2, help="CPUs of the local Ray the Lantern job starts."),
    address: str | None = typer.Option(None, help="Ray address for the Lantern job (default: a new local instance)."),
):
    """Predict every utterance of a corpus with a built ensemble, no retraining: vanilla seeds -> LLM members ->
    the saved fusion -> the label map. Rows without a label are predicted (they are context); `mer eval` skips them."""
    from mer_ray.ensemble.predict import CorpusPredictConfig, predict_corpus

    cfg = CorpusPredictConfig(models=str(models), manifest=str(manifest), out=str(out),
                              label_map=str(label_map) if label_map else None, llm=llm, lantern=lantern, split=split,
                              work_dir=str(work_dir) if work_dir else None, batch_size=batch_size, ray_cpus=ray_cpus,
                              address=address)
    s = predict_corpus(cfg)
    typer.echo(f"wrote {s['rows']} predictions ({s['unlabelled_rows']} without a gold label: context, not scored) "
               f"over {s['labels']} to {s['out']}; members {s['members'] or ['vanilla seed average']}, "
               f"Lantern {s['lantern']}")
