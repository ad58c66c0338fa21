"""``mer ensemble``: vanilla seeds -> Lantern prompts -> LLM fine-tuning -> member predictions -> fusion -> report.

Each stage writes into its own directory under ``out`` and is skipped when its
output is complete, so a killed or restarted run continues where it stopped:
the vanilla recipe and the fine-tuning resume from Ray Train checkpoints
(at most 10 minutes apart), the Lantern job from its finished parts, the
cross-fitted references from finished folds, the predictions per split.
``out/stages.json`` keeps each stage's wall time from the run that did it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.ensemble.config import EnsembleConfig


class Stages:
    """Runs stages once, recording the wall time of the run that did the work (``stages.json``)."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.wall = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, done: bool, fn, *args, **kwargs):
        if done:
            was = self.wall.setdefault(name, None)  # None: finished by an earlier run that recorded no time
            print(f"[ensemble] {name}: done{f' ({was:.0f} s when it ran)' if was else ''}, skipped", flush=True)
            self.path.write_text(json.dumps(self.wall, indent=1))
            return None
        print(f"[ensemble] {name}: running", flush=True)
        t0 = time.time()
        res = fn(*args, **kwargs)
        # a stage resumed after a kill records the resumed part only; the note in stages.json's reader says so
        self.wall[name] = round(time.time() - t0, 1)
        self.path.write_text(json.dumps(self.wall, indent=1))
        print(f"[ensemble] {name}: finished in {time.time() - t0:.0f} s", flush=True)
        return res


def seed_average(seed_dirs: list[Path], split: str, out: Path) -> Path:
    """The vanilla seeds' mean distribution for ``split`` as a prediction file (the references of Lantern x FARCER)."""
    tables = [pq.read_table(d / f"predictions_{split}.parquet") for d in seed_dirs]
    keys = [list(zip(t.column("dialogue_id").to_pylist(), t.column("turn").to_pylist())) for t in tables]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"vanilla seeds predict different rows for {split}")
    probs = np.mean([np.asarray(t.column("emotion_probs").to_pylist(), dtype=np.float64) for t in tables], axis=0)
    labels = json.loads(tables[0].schema.metadata[b"emotion_labels"])
    t = tables[0].select(["dialogue_id", "turn", "speaker", "text", "split"])
    t = t.append_column("emotion_probs", pa.array(list(probs.astype(np.float32)), type=pa.list_(pa.float32())))
    t = t.append_column("emotion_pred", pa.array([labels[i] for i in probs.argmax(1)]))
    path = out / f"predictions_{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.replace_schema_metadata({"emotion_labels": json.dumps(labels), "model": "vanilla seed average"}), path)
    return path


def _vanilla(cfg: EnsembleConfig, meld: str, out: Path) -> None:
    from mer_ray.config import load
    from mer_ray.vanilla.recipe import PipelineConfig, run_pipeline

    run_pipeline(load(PipelineConfig, cfg.vanilla), meld, out)


def _finetune(cfg_path: str, meld: str, out: Path, name: str, references: dict[str, str] | None = None) -> None:
    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.train import run_finetune

    sets = [("data.meld_dir", meld), ("out", str(out)), ("ray.name", name), ("ray.storage_path", str(out.parent / "ray_results"))]
    sets += [(f"data.references.{s}", p) for s, p in (references or {}).items()]
    run_finetune(load(FinetuneConfig, cfg_path, sets))


def _predict_llm(model_dir: Path, meld: str, split: str, batch_size: int, references: str | None) -> None:
    from mer_ray.mllm.dialogue import read_references
    from mer_ray.mllm.examples import DataConfig, load_dialogues
    from mer_ray.mllm.predict import MLLMPredictor, predict_table

    pred = MLLMPredictor.from_dir(model_dir, batch_size=batch_size)
    dialogues = load_dialogues(DataConfig(meld_dir=meld), split, {})
    refs = read_references(references, pred.labels) if pred.prompt.references else None
    path = model_dir / "predictions" / f"predictions_{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(predict_table(pred, dialogues, split, None, refs), tmp)
    tmp.rename(path)  # complete or absent: a killed run predicts the split again


def run_ensemble_recipe(cfg: EnsembleConfig) -> dict:
    """Run every stage on the running Ray; returns the ensemble report."""
    from mer_ray.data.loaders import meld_dir

    meld = str(Path(meld_dir(cfg.data_dir)).resolve())
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out)
    van = out / "vanilla"
    st.run("vanilla", (van / "report.json").exists(), _vanilla, cfg, meld, van)
    seeds = sorted((van / "predictions").glob("seed*"), key=lambda p: int(p.name[4:]))
    avg = {s: str(seed_average(seeds, s, van / "predictions" / "avg")) for s in cfg.splits}
    members: dict[str, dict[str, str]] = {}
    lantern_dir = None
    if cfg.lantern:
        from mer_ray.config import load
        from mer_ray.lantern.config import PromptJobConfig
        from mer_ray.lantern.prompt import prompt_main

        lantern_dir = out / "lantern"
        pcfg = load(PromptJobConfig, cfg.lantern, [("vanilla", str(van / "predictions" / f"seed{cfg.lantern_reference_seed}")),
                                                   ("out", str(lantern_dir)), ("splits", cfg.splits)])
        summary = lantern_dir / "summary.json"
        done = summary.exists() and json.loads(summary.read_text()).get("missing", 1) == 0
        st.run("lantern_prompts", done, prompt_main, pcfg)
    for name, path, refs in (("farcer", cfg.farcer, None), ("lantern_farcer", cfg.lantern_farcer, True)):
        if not path:
            continue
        refs_map = None
        if refs:
            from mer_ray.config import load
            from mer_ray.ensemble.references import crossfit_references
            from mer_ray.vanilla.recipe import PipelineConfig

            rdir = out / "references"
            r = cfg.references
            tcfg = load(PipelineConfig, r.recipe).train
            st.run("references", (rdir / "summary.json").exists(), crossfit_references, van / "features", rdir, tcfg, r.k, r.seed, r.parallel)
            refs_map = {"train": str(rdir / "train_references.parquet"), **avg}
        from mer_ray.mllm.artifacts import META_FILE

        mdir = out / name
        st.run(f"{name}_train", (mdir / META_FILE).exists(), _finetune, path, meld, mdir, f"ensemble_{name}", refs_map)
        for split in cfg.splits:
            p = mdir / "predictions" / f"predictions_{split}.parquet"
            st.run(f"{name}_predict_{split}", p.exists(), _predict_llm, mdir, meld, split, cfg.predict_batch_size,
                   (refs_map or {}).get(split))
        members[name] = {s: str(mdir / "predictions" / f"predictions_{s}.parquet") for s in cfg.splits}
    from mer_ray.ensemble.experiment import run_ensemble

    t0 = time.time()
    report = run_ensemble([van / "predictions" / s.name for s in seeds], lantern_dir, members, meld, out / "report",
                          wall_s={**st.wall, "fusion_report": None})
    st.wall["fusion_report"] = round(time.time() - t0, 1)
    st.path.write_text(json.dumps(st.wall, indent=1))
    report["wall_s"] = dict(st.wall)
    (out / "report" / "report.json").write_text(json.dumps(report, indent=1))
    from mer_ray.calibration.calibrate import fit_dir

    st.run("calibration", False, fit_dir, out, meld=meld)  # <out>/calibration.json, from report/dev_predictions.parquet
    if cfg.evidence:
        ev = Path(cfg.evidence)
        ev.mkdir(parents=True, exist_ok=True)
        for f in ("report.json", "report.md", "ablation.png", "test_predictions.parquet", "dev_predictions.parquet"):
            if (out / "report" / f).exists():
                shutil.copy(out / "report" / f, ev / f)
        from mer_ray.calibration.apply import calibrate_run_evidence

        calibrate_run_evidence(out, ev, meld=meld)  # the committed rows are the calibrated ones (uncalibrated copies kept)
    return report
