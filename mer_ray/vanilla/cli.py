"""`mer` subcommands for the vanilla area: train, predict vanilla, eval, pipeline, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer()
predict_app = typer.Typer()

#: The MELD recipe that `mer pipeline --dataset meld` runs when no --config is given, read by path
#: from the current directory (a checkout); elsewhere, pass --config.
MELD_RECIPE = Path("jobs/vanilla_meld.yaml")
SET_HELP = "Override a config key, e.g. --set train.epochs=3 (repeatable)."


def _gold_table(dataset: str, data: Path):
    from mer_ray.vanilla.recipe import load_dataset

    return load_dataset(dataset, data)


@app.command("train")
def train(
    store: Path = typer.Option(..., help="feature store (Parquet dir from `mer extract`) with a `split` column"),
    out: Path = typer.Option(..., help="run directory: Ray Train state under ray_train/, the best model under models/vanilla/seed{S}"),
    config: Path | None = typer.Option(None, help="a jobs/vanilla_*.yaml (its `train:` block is used)"),
    seed: int | None = typer.Option(None, help="seed (default: the config's first seed)"),
    epochs: int | None = typer.Option(None, help="override train.epochs"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Train one seed of the vanilla model with Ray Train; re-running the same command resumes it."""
    from mer_ray.config import load
    from mer_ray.runtime import start_ray
    from mer_ray.vanilla.recipe import PipelineConfig
    from mer_ray.vanilla.train import fit

    cfg = load(PipelineConfig, config, set_)
    s = cfg.seeds[0] if seed is None else seed
    tcfg = cfg.train.model_copy(update={"seed": s, **({"epochs": epochs} if epochs else {})})
    start_ray(cfg.ray_num_cpus)
    res = fit(tcfg, store, out / "ray_train", f"vanilla_seed{s}", export_dir=out / "models" / "vanilla" / f"seed{s}")
    typer.echo(json.dumps({"best_epoch": res["best_epoch"], "model_dir": res["export_dir"], "history": res["history"]}, indent=1))


@predict_app.command("vanilla")
def predict_vanilla(
    model: Path = typer.Option(..., help="model directory (models/vanilla/seed{S}) or a Ray Train checkpoint"),
    input: Path = typer.Option(..., help="feature store dir, or a Parquet/CSV/JSONL manifest (frozen-feature models need the store)"),
    out: Path = typer.Option(..., help="predictions Parquet to write"),
    split: str | None = typer.Option(None, help="only rows whose `split` column equals this"),
) -> None:
    """Write per-utterance distributions (emotion, sentiment, VAD); the file never holds gold columns."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from mer_ray.vanilla.predict import VanillaPredictor, drop_gold

    if input.is_dir():
        table = ds.dataset(str(input), format="parquet").to_table()
    else:
        from mer_ray.data.loaders import load_manifest

        table = load_manifest(input)
    table = drop_gold(table)
    if split is not None:
        if "split" not in table.column_names:
            raise typer.BadParameter(f"{input} has no `split` column", param_hint="--split")
        table = table.filter(pc.equal(table.column("split"), split))
        if table.num_rows == 0:
            raise typer.BadParameter(f"no rows with split={split!r} in {input}", param_hint="--split")
    pred = VanillaPredictor.from_dir(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pred.predictions_table(table), out)
    typer.echo(f"wrote {table.num_rows} predictions to {out}")


@app.command("eval")
def eval_(
    predictions: list[Path] = typer.Argument(..., help="predictions Parquet files of one split, one per seed"),
    data: Path = typer.Option(..., help="gold source: a MELD directory, or a manifest with `label`"),
    out: Path = typer.Option(..., help="report directory (report.json, report.md, PNGs)"),
    dataset: str = typer.Option("meld", help="meld or manifest"),
    split: str = typer.Option("test", help="the split the predictions cover"),
    label_map: Path | None = typer.Option(None, help="YAML {target_label: [model labels...]}: score on the targets "
                                                      "(predictions in model labels are summed and renormalised)"),
    store: Path | None = typer.Option(None, help="feature store (Parquet dir with a `split` column and train rows): fit a linear "
                                                 "probe on its train split (C chosen on dev) and score it on --split beside the model"),
    features: str | None = typer.Option(None, help="comma-separated probe columns, the model's own (default: the store's model-readable "
                                                   "feature columns, of mer_ray.eval.probe.FEATURE_COLUMNS)"),
) -> None:
    """Weighted F1, accuracy, macro F1, per-class F1, UAR/WAR, confusion matrix; seeds -> mean ± std.
    Rows whose gold label is empty are context, not scored: they are skipped and counted.
    With --store, a standardised logistic regression on the same features is scored on the same rows,
    and a model that loses to it is flagged."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mer_ray.eval.probe import summary_lines
    from mer_ray.eval.report import build_report, evaluate_predictions, to_markdown

    if dataset == "manifest":  # another corpus may have no split column: then it is one split
        from mer_ray.data.loaders import load_manifest

        gold = load_manifest(data)
    else:
        gold = _gold_table(dataset, data)
    if "split" in gold.column_names:
        gold = gold.filter(pc.equal(gold.column("split"), split))
    store_table, probe_cols = _probe_inputs(store, features)
    unlabelled = {k for k, g in zip(zip(gold["dialogue_id"].to_pylist(), gold["turn"].to_pylist()),
                                    gold["label"].to_pylist()) if g in (None, "")}
    lmap = None
    if label_map is not None:
        from mer_ray.data.labelmap import read_label_map

        lmap = read_label_map(label_map)
        bad = sorted({g for g in gold["label"].to_pylist() if g not in (None, "")} - set(lmap.targets))
        if bad:
            raise typer.BadParameter(f"gold labels {bad} of {data} are not keys of {label_map}", param_hint="--label-map")
    per_seed, skipped = {}, 0
    for i, p in enumerate(predictions):
        seed = json.loads((pq.read_schema(p).metadata or {}).get(b"seed", b"null")) if p.exists() else None
        table, skipped = _scored_rows(pq.read_table(p), split, unlabelled, lmap)
        per_seed[seed if isinstance(seed, int) and seed not in per_seed else 1000 + i] = {split: evaluate_predictions(table, gold)}
    report = build_report(per_seed, out, extra={"predictions": [str(p) for p in predictions], "unlabelled_skipped": skipped,
                                                "label_map": str(label_map) if label_map else None})
    report["probe"] = (_probe(store_table, probe_cols, report, split, gold, unlabelled, lmap) if store_table is not None else
                       {"skipped": "no --store given; pass --store FEATURE_STORE (with train rows) to compare with a linear probe"})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(to_markdown(report, [split]))
    r = report[split]
    typer.echo(f"{split}: weighted F1 {r['weighted_f1']:.2f} ± {r['weighted_f1_std']:.2f}, accuracy {r['accuracy']:.2f}, "
               f"macro F1 {r['macro_f1']:.2f} over {len(per_seed)} seed(s), {r['n']} scored rows, "
               f"{skipped} unlabelled rows skipped; report in {out / 'report.md'}")
    for line in summary_lines(report["probe"], [split]):
        typer.echo(line)


def _probe_inputs(store: Path | None, features: str | None):
    """The store's rows and the probe's columns (None, None without --store); bad options stop here, before any work."""
    if store is None:
        if features:
            raise typer.BadParameter("--features needs --store", param_hint="--features")
        return None, None
    import pyarrow.dataset as ds

    from mer_ray.eval.probe import FEATURE_COLUMNS, default_features

    if not store.exists():
        raise typer.BadParameter(f"{store} does not exist", param_hint="--store")
    table = ds.dataset(str(store), format="parquet").to_table()
    if "label" not in table.column_names:
        raise typer.BadParameter(f"{store} has no `label` column to train the probe on", param_hint="--store")
    if "split" not in table.column_names or "train" not in set(table["split"].to_pylist()):
        raise typer.BadParameter(f"{store} has no rows with split == 'train' to fit the probe on", param_hint="--store")
    cols = [c.strip() for c in features.split(",") if c.strip()] if features else default_features(table.column_names)
    lacking = [c for c in cols if c not in table.column_names]
    if lacking or not cols:
        raise typer.BadParameter(f"{store} lacks feature columns {lacking or list(FEATURE_COLUMNS)}", param_hint="--features")
    return table, cols


def _probe(store_table, cols: list[str], report: dict, split: str, gold, unlabelled: set, lmap) -> dict:
    """``report["probe"]`` for ``mer eval``: fitted on the store's train rows (C on its dev rows), scored on its
    ``split`` rows that the model was scored on; ``{"skipped": reason}`` when it cannot run."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mer_ray.eval.probe import fit_probe, probe_block, probe_metrics

    def rows(name):
        t = store_table.filter(pc.equal(store_table["split"], name))
        if lmap is not None:  # a store in the model's labels trains on their targets
            to = {src: tgt for tgt, srcs in lmap.sources.items() for src in srcs if src not in lmap.targets}
            t = t.set_column(t.schema.get_field_index("label"), "label", pa.array([to.get(v, v) for v in t["label"].to_pylist()], pa.string()))
        return t

    try:
        dev = rows("dev")
        probe = fit_probe(rows("train"), cols, report[split]["labels"], dev_table=dev if dev.num_rows else None)
        scored = rows(split)
        scored = scored.filter(pa.array([k not in unlabelled for k in zip(scored["dialogue_id"].to_pylist(), scored["turn"].to_pylist())], pa.bool_()))
        return probe_block(report, probe, probe_metrics(probe, {split: scored}, gold))
    except ValueError as e:
        return {"skipped": str(e)}


def _scored_rows(table, split: str, unlabelled: set, lmap):
    """The prediction rows ``mer eval`` scores (``split``'s, unlabelled gold rows left out, mapped by ``lmap``)
    and how many unlabelled rows were left out."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if "split" in table.column_names and split in set(table["split"].to_pylist()):
        table = table.filter(pc.equal(table["split"], split))
    keys = list(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist()))
    keep = [k not in unlabelled for k in keys]
    meta = dict(table.schema.metadata or {})
    table = table.filter(pa.array(keep))
    labels = json.loads(meta[b"emotion_labels"])
    if lmap is not None and labels != list(lmap.targets):  # already mapped (mer predict ensemble --label-map): as is
        probs = lmap.apply(np.asarray(table["emotion_probs"].to_pylist(), dtype=np.float64), labels)
        table = table.set_column(table.schema.get_field_index("emotion_pred"), "emotion_pred",
                                 pa.array([lmap.targets[j] for j in probs.argmax(1)], pa.string()))
        meta[b"emotion_labels"] = json.dumps(list(lmap.targets)).encode()
    return table.replace_schema_metadata(meta), len(keep) - sum(keep)


@app.command("pipeline")
def pipeline(
    out: Path = typer.Option(..., help="run directory; report.json lands here"),
    dataset: str = typer.Option("meld", help="meld (a directory of MELD CSVs) or manifest (a file with a `split` column)"),
    data_dir: Path | None = typer.Option(None, help="the MELD directory (dataset=meld)"),
    manifest: Path | None = typer.Option(None, help="the manifest file (dataset=manifest)"),
    media_root: Path | None = typer.Option(None, help="where manifest media paths resolve"),
    config: Path | None = typer.Option(None, help="a jobs/vanilla_*.yaml (default for --dataset meld: jobs/vanilla_meld.yaml)"),
    seeds: str | None = typer.Option(None, help="comma-separated seeds overriding the config's"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """extract -> train (one Ray Train run per seed, selected on dev) -> predict -> eval; writes report.json."""
    import ray

    from mer_ray.config import load
    from mer_ray.eval.probe import summary_lines
    from mer_ray.runtime import start_ray
    from mer_ray.vanilla.recipe import PipelineConfig, run_pipeline

    data = data_dir if dataset == "meld" else manifest
    if data is None:
        raise typer.BadParameter("give --data-dir for meld or --manifest for manifest")
    overrides = [f"dataset={dataset}", *([f"seeds=[{seeds}]"] if seeds else []), *set_]
    if config is None and dataset == "meld":
        config = MELD_RECIPE if MELD_RECIPE.exists() else None  # the documented MELD run
    cfg = load(PipelineConfig, config, overrides)
    started = start_ray(cfg.ray_num_cpus)
    try:
        report = run_pipeline(cfg, data, out, media_root)
    finally:
        if started:
            ray.shutdown()
    for split in cfg.predict_splits:
        r = report[split]
        typer.echo(f"{split}: weighted F1 {r['weighted_f1']:.2f} ± {r['weighted_f1_std']:.2f}, accuracy {r['accuracy']:.2f} ± "
                   f"{r['accuracy_std']:.2f}, macro F1 {r['macro_f1']:.2f} ± {r['macro_f1_std']:.2f}")
    for line in summary_lines(report.get("probe"), cfg.predict_splits):
        typer.echo(line)
    typer.echo(f"report: {out / 'report.json'} ({out / 'report.md'}); wall {report['wall_seconds']:.0f}s")
