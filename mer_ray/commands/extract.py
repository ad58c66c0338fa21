"""`mer` subcommands for the extract area: ``mer extract`` and ``mer bench extract``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mer_ray.cli import app, bench_app, lantern_app, predict_app  # noqa: F401


@app.command("extract")
def extract(
    manifest: Path = typer.Option(..., help="Manifest (CSV, JSONL or Parquet): one row per utterance."),
    out: Path = typer.Option(..., help="Output directory: the Parquet feature store. Re-running resumes."),
    media_root: Path = typer.Option(None, help="Directory every video/audio path resolves under "
                                    "(default: the manifest's directory). Paths outside it fail."),
    config: Path = typer.Option(None, help="YAML/JSON ExtractConfig (frames, encoders, per-stage CPUs/GPUs)."),
    text_only: bool = typer.Option(False, "--text-only", help="Ignore media columns; text features only."),
    progress: bool = typer.Option(True, help="Show a progress bar of utterances done."),
    ray_address: str = typer.Option(None, help="Attach to this Ray cluster ('auto' inside `ray job submit`); "
                                    "default: start a local Ray."),
) -> None:
    """Extract text, face and voice features into a Parquet feature store, on Ray Data.

    Exits 0 when the run completed, whatever the rows' status (each row records
    ok / partial / failed and why); non-zero only when the run itself could not complete.
    """
    from mer_ray.features.config import load_config
    from mer_ray.features.pipeline import ExtractError, run_extract

    try:
        cfg = load_config(config)
        if text_only:
            cfg = cfg.model_copy(update={"media": False})
        summary = run_extract(manifest, out, media_root=media_root, config=cfg, progress=progress,
                              address=ray_address)
    except (ExtractError, FileNotFoundError, ValueError) as e:
        typer.echo(f"mer extract: {e}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - the run itself failed (e.g. Ray): say so, exit non-zero
        typer.echo(f"mer extract: the run could not complete: {type(e).__name__}: {e}\n"
                   "Re-running the same command resumes from the finished shards.", err=True)
        raise typer.Exit(1) from None
    typer.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    """The human-readable summary: counts per status and the most common reasons."""
    s = summary["status"]
    lines = [f"extracted {summary['rows']} utterances into {summary['out_dir']} in {summary['seconds']} s "
             f"({summary['shards_skipped']} of {summary['shards']} shards already done)",
             f"  ok: {s['ok']}   partial: {s['partial']}   failed: {s['failed']}"]
    if summary.get("stage_seconds"):
        lines.append("  seconds per stage (summed over actors): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in summary["stage_seconds"].items()))
    if summary["top_reasons"]:
        lines.append("  most common reasons:")
        lines += [f"    {n:6d}  {reason}" for reason, n in summary["top_reasons"]]
    return "\n".join(lines)


@bench_app.command("extract")
def bench_extract(
    out: Path = typer.Option(..., help="JSON file to write."),
    n_utterances: int = typer.Option(60, help="Clips to generate (at least 60)."),
    seconds: float = typer.Option(3.0, help="Clip length."),
    fps: int = typer.Option(10, help="Frames per second of the clips."),
    width: int = typer.Option(320, help="Frame width in pixels."),
    work_dir: Path = typer.Option(None, help="Where clips and outputs go (default: a temp directory)."),
) -> None:
    """Time the Ray pipeline against a plain loop (default threads, and one thread); write JSON."""
    from mer_ray.features.bench import run_bench

    if n_utterances < 60:
        typer.echo("mer bench extract: --n-utterances must be at least 60", err=True)
        raise typer.Exit(2)
    result = run_bench(n_utterances=n_utterances, seconds=seconds, fps=fps, width=width, work_dir=work_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps({k: result[k] for k in ("speedup", "efficiency", "utterances_per_second")}, indent=2))
