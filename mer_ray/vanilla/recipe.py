"""``mer pipeline``: extract -> train -> predict -> eval for the vanilla model, one command.

Steps, each timed into ``report.json["step_seconds"]``:

1. ``load``: the dataset (MELD CSVs, or a manifest with a ``split`` column);
2. ``extract``: the Ray Data feature pipeline (``mer_ray.features.job.run_extract``);
3. ``train``: one Ray Train run per seed; each seed's epoch is selected on dev;
4. ``predict``: predictions Parquet per seed and split, from inputs with gold stripped;
5. ``eval``: metrics per seed, mean ± std, plots; test is scored once, here;
6. ``probe``: a standardised logistic regression on the same store, train split and feature
   columns (``mer_ray.eval.probe``), scored on the same rows: ``report.json["probe"]``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow as pa
import yaml
from pydantic import Field

from mer_ray.config import StrictModel
from mer_ray.vanilla.train import TrainConfig


class PipelineConfig(StrictModel):
    """The whole vanilla run: data, seeds, extraction and training settings."""

    dataset: str = "meld"
    """``meld`` (a directory of MELD CSVs) or ``manifest`` (a file with a ``split`` column)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Seeds, fixed before the run; one trained model each."""
    predict_splits: list[str] = Field(default_factory=lambda: ["dev", "test"], min_length=1)
    """Splits predicted and evaluated at the end (test only here, once)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training settings shared by all seeds (``train.seed`` is replaced per seed)."""
    extract: dict = Field(default_factory=dict)
    """``mer_ray.features`` ExtractConfig fields (empty: its defaults)."""
    parallel_seeds: int = Field(1, ge=1)
    """Seeds trained at once (concurrent Ray Train runs)."""
    predict_threads: int = Field(2, ge=1)
    """torch threads for the predict step."""
    ray_num_cpus: int = Field(4, ge=1)
    """Logical CPUs of the local Ray instance started when none is running."""

    def sha256(self) -> str:
        """Hash of the resolved config (sorted-key JSON)."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


def load_dataset(dataset: str, data: str | Path) -> pa.Table:
    """All rows of a dataset with a ``split`` column (MELD: train, dev and test)."""
    from mer_ray.data import loaders

    if dataset == "meld":
        return pa.concat_tables([loaders.load_meld(data, s) for s in ("train", "dev", "test")], promote_options="default")
    if dataset == "manifest":
        table = loaders.load_manifest(data)
        if "split" not in table.column_names:
            raise ValueError(f"manifest {data} has no 'split' column (train/dev/test)")
        return table
    raise ValueError(f"unknown dataset {dataset!r}; expected 'meld' or 'manifest'")


class StepTimer:
    """Times the recipe's steps into a dict and prints progress lines."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"[pipeline] {name} ...", flush=True)
        t0 = time.time()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - t0, 2)
        print(f"[pipeline] {name} done in {self.seconds[name]:.1f}s", flush=True)
        return out


def extract_features(table: pa.Table, out: Path, cfg: PipelineConfig, media_root: str | Path | None) -> Path:
    from mer_ray.features.job import run_extract

    store = out / "features"
    summary = run_extract(table, store, media_root=media_root, config=cfg.extract or None)
    print(f"[pipeline] feature store {store}: {json.dumps({k: summary.get(k) for k in ('rows', 'status', 'seconds')})}")
    return store


def train_seeds(store: Path, out: Path, cfg: PipelineConfig) -> dict:
    """One Ray Train run per seed; ``parallel_seeds`` of them at once (each worker takes
    ``train.num_threads`` threads, so 2 x 1 thread fills 2 cores)."""
    from concurrent.futures import ThreadPoolExecutor

    from mer_ray.vanilla.train import fit

    def one(seed: int) -> dict:
        tcfg = cfg.train.model_copy(update={"seed": seed})
        t0 = time.time()
        res = fit(tcfg, store, out / "ray_train", f"vanilla_seed{seed}", export_dir=out / "models" / "vanilla" / f"seed{seed}")
        res["seconds"] = round(time.time() - t0, 2)
        best = next(h for h in res["history"] if h["epoch"] == res["best_epoch"])
        print(f"[pipeline] seed {seed}: best epoch {res['best_epoch']} (dev wF1 {best['dev_weighted_f1']:.2f}) in {res['seconds']:.0f}s", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=cfg.parallel_seeds) as pool:
        return dict(zip(cfg.seeds, pool.map(one, cfg.seeds)))


def predict_seeds(store: Path, out: Path, cfg: PipelineConfig) -> dict[int, dict[str, Path]]:
    import pyarrow.parquet as pq

    from mer_ray.vanilla.predict import VanillaPredictor, drop_gold
    from mer_ray.vanilla.train import read_store_split

    paths: dict[int, dict[str, Path]] = {}
    inputs = {s: drop_gold(read_store_split(store, s)) for s in cfg.predict_splits}  # gold never reaches the model
    for seed in cfg.seeds:
        pred = VanillaPredictor.from_dir(out / "models" / "vanilla" / f"seed{seed}", num_threads=cfg.predict_threads)
        for split, table in inputs.items():
            path = out / "predictions" / f"seed{seed}" / f"predictions_{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pred.predictions_table(table), path)
            paths.setdefault(seed, {})[split] = path
    return paths


def evaluate_seeds(gold: pa.Table, paths: dict[int, dict[str, Path]], out: Path, extra: dict) -> dict:
    import pyarrow.compute as pc

    from mer_ray.eval.report import build_report, evaluate_predictions

    per_seed = {seed: {split: evaluate_predictions(p, gold.filter(pc.equal(gold.column("split"), split)))
                       for split, p in by_split.items()} for seed, by_split in paths.items()}
    return build_report(per_seed, out, title="vanilla multi-task model", extra=extra)


def probe_baseline(store: Path, gold: pa.Table, cfg: PipelineConfig, report: dict) -> dict:
    """``report["probe"]``: the linear probe on the model's columns, fitted on the train split (C on dev) and
    compared with the seed mean on each predicted split; ``{"skipped": reason}`` when it cannot run."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from mer_ray.data.labels import get_label_set
    from mer_ray.eval.probe import fit_probe, probe_block, probe_features, probe_metrics
    from mer_ray.vanilla.train import read_store_split

    t = cfg.train
    try:
        cols = probe_features(t.model.modalities, t.model.encoder, ds.dataset(str(store), format="parquet").schema.names)
        train = read_store_split(store, t.train_split)
        if t.max_train_dialogues:  # the model's rows: the first N dialogues by id
            keep = sorted(set(train.column("dialogue_id").to_pylist()))[: t.max_train_dialogues]
            train = train.filter(pc.is_in(train.column("dialogue_id"), pa.array(keep)))
        dev = read_store_split(store, t.dev_split)
        probe = fit_probe(train, cols, get_label_set(t.emotion_labels).labels, seed=cfg.seeds[0], dev_table=dev if dev.num_rows else None)
        metrics = probe_metrics(probe, {s: read_store_split(store, s) for s in cfg.predict_splits}, gold)
        return probe_block(report, probe, metrics)
    except Exception as e:  # a baseline must never sink the run it reports on
        print(f"[pipeline] linear probe skipped: {type(e).__name__}: {e}", flush=True)
        return {"skipped": f"{type(e).__name__}: {e}"}


def run_pipeline(cfg: PipelineConfig, data: str | Path, out: str | Path, media_root: str | Path | None = None) -> dict:
    """Run every step on the running Ray and write ``out/report.json`` (see docs/vanilla.md for its contract)."""
    from mer_ray.eval.report import to_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    t0 = time.time()
    st = StepTimer()
    table = st.run("load", load_dataset, cfg.dataset, data)
    store = st.run("extract", extract_features, table, out, cfg, media_root)
    trained = st.run("train", train_seeds, store, out, cfg)
    paths = st.run("predict", predict_seeds, store, out, cfg)
    extra = {"dataset": cfg.dataset, "data": str(data), "config_sha256": cfg.sha256(), "step_seconds": st.seconds,
             "best_epochs": {str(s): r["best_epoch"] for s, r in trained.items()},
             "training": {str(s): r["history"] for s, r in trained.items()},
             "predictions": {str(s): {k: str(v) for k, v in d.items()} for s, d in paths.items()}}
    report = st.run("eval", evaluate_seeds, table, paths, out, extra)
    report["probe"] = st.run("probe", probe_baseline, store, table, cfg, report)
    if "dev" in cfg.predict_splits:  # temperatures + conformal scores of the seed average: <out>/models/calibration.json
        from mer_ray.calibration.calibrate import fit_dir
        from mer_ray.calibration.sources import gold_from_table

        cal = fit_dir(out / "models", gold=gold_from_table(table), strict=False)  # a tiny dev set: skipped, said so
        report["calibration"] = cal.temperatures if cal else None
    report["step_seconds"] = st.seconds
    report["wall_seconds"] = round(time.time() - t0, 2)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(to_markdown(report, cfg.predict_splits))
    return report
