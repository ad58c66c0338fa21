"""`mer` subcommands for the extract area: ``mer extract`` and ``mer bench extract``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer()


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
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set n_frames=4 (repeatable)."),
) -> None:
    """Extract text, face and voice features into a Parquet feature store, on Ray Data.

    Exits 0 when the run completed, whatever the rows' status (each row records
    ok / partial / failed and why); non-zero only when the run itself could not complete.
    """
    from mer_ray.config import load
    from mer_ray.features.config import ExtractConfig
    from mer_ray.features.job import ExtractError, run_extract
    from mer_ray.runtime import start_ray

    try:
        cfg = load(ExtractConfig, config, set_)
        if text_only:
            cfg = cfg.model_copy(update={"media": False})
        start_ray(address=ray_address, object_store_memory=cfg.object_store_mb * 2**20, log_to_driver=False)
        summary = run_extract(manifest, out, media_root=media_root, config=cfg, progress=progress)
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
    r = summary.get("retried") or {}
    if r.get("attempts", 1) > 1:
        lines.append(f"  retried: {r['attempts'] - 1} re-run(s) after a lost worker or node ({'; '.join(r['errors'])}): "
                     f"{r['rows_redone']} rows redone, {r['rows_discarded']} of them received before the failure")
    if summary["top_reasons"]:
        lines.append("  most common reasons:")
        lines += [f"    {n:6d}  {reason}" for reason, n in summary["top_reasons"]]
    return "\n".join(lines)
