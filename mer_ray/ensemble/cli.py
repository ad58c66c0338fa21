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
