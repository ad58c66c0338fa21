"""`mer data ...`: inspect a dataset through the loaders."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Inspect datasets through the loaders.", no_args_is_help=True)



@app.command("summary")
def summary(
    dataset: str = typer.Option(None, "--dataset", help="A named dataset: 'meld' (needs --data-dir)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="MELD directory with {train,dev,test}_sent_emo.csv."),
    split: list[str] = typer.Option(None, "--split", help="MELD split(s) to load (repeatable); default all three."),
    manifest: Path = typer.Option(None, "--manifest", help="A generic manifest (.csv, .jsonl or .parquet)."),
    label_set: str = typer.Option(None, "--label-set", help="Validate a manifest's 'label' against this set."),
) -> None:
    """Load a dataset, fully validated, and print its summary (counts per split, labels, empty texts) as JSON.

    Bad input stops with the loader's message (file, row, value) and exit code 2.
    """
    from mer_ray.data.loaders import MELD_SPLITS, DataError, load_manifest, load_meld, summarize

    if (dataset is None) == (manifest is None):
        raise typer.BadParameter("give exactly one of --dataset or --manifest")
    try:
        if manifest is not None:
            out = {"manifest": str(manifest), **summarize(load_manifest(manifest, label_set=label_set))}
        elif dataset.lower() == "meld":
            if data_dir is None:
                raise typer.BadParameter("--dataset meld needs --data-dir")
            splits = split or list(MELD_SPLITS)
            out = {"dataset": "meld", "data_dir": str(data_dir),
                   "splits": {s: summarize(load_meld(data_dir, s)) for s in splits}}
        else:
            raise typer.BadParameter(f"unknown dataset {dataset!r}; known: meld (or use --manifest)")
    except (DataError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(out, indent=2))
