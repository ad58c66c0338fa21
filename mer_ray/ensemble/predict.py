"""``mer predict ensemble``: a built ensemble predicts another corpus, with no retraining.

The models directory is what ``mer ensemble`` wrote (``runs/ensemble_meld``):
the vanilla seeds under ``vanilla/models/vanilla/seed*``, the Lantern prompt job
``lantern/`` (its ``job.json`` holds the prompt settings), the fine-tuned LLM
members (``farcer/``, ``lantern_farcer/``) and the fitted fusion in
``report/fusion/``. For a manifest corpus:

1. every vanilla seed predicts every row; their mean is the vanilla input;
2. the members the fusion was fitted with predict (FARCER in process, Lantern
   as a prompt job on a local Ray, resumable in the work directory);
3. the saved fusion is applied as fitted; ``mode: vanilla`` is the seed mean;
4. an optional label map sums and renormalises every distribution onto the
   corpus's labels (:mod:`mer_ray.data.labelmap`).

Gold columns are dropped before any model sees the table and never reach the
output; rows without a label are predicted like the others (they are context
of their dialogue), and ``mer eval`` leaves them out of the scores.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from mer_ray.config import StrictModel
from mer_ray.data.labelmap import LabelMap, read_label_map
from mer_ray.data.leak import strip_gold

log = logging.getLogger(__name__)
KEY_COLUMNS = ("dialogue_id", "turn", "speaker", "text", "split")
#: The split name the LLM jobs see: a corpus is predicted as one block, whatever its ``split`` column says.
LLM_SPLIT = "corpus"
F32 = pa.list_(pa.float32())


class CorpusPredictConfig(StrictModel):
    """``mer predict ensemble``."""

    models: str
    """The ensemble run directory (``mer ensemble``'s ``out``, e.g. ``runs/ensemble_meld``)."""
    manifest: str
    """The corpus: a CSV/JSONL/Parquet manifest (``mer_ray.data.loaders.load_manifest``)."""
    out: str
    """The predictions Parquet to write."""
    label_map: str | None = None
    """YAML ``{target_label: [model labels...]}``; None keeps the model's labels."""
    llm: bool = True
    """False: the vanilla seed average only (no LLM member, no fusion)."""
    lantern: bool = True
    """False: skip the Lantern prompt job even when the fusion uses it (its candidates are then all masked)."""
    split: str | None = None
    """Only the manifest rows whose ``split`` column equals this."""
    work_dir: str | None = None
    """Member predictions and the Lantern job (resumable); default ``<out>.work``."""
    batch_size: int = Field(4, ge=1)
    """Prompts/segments per forward pass of the FARCER members."""
    ray_cpus: int = Field(2, ge=1)
    """CPUs of the local Ray instance the Lantern job starts."""
    lantern_actors: int = Field(1, ge=1)
    """LLM engines of the Lantern job."""
    address: str | None = None
    """A Ray cluster for the Lantern job (default: a new local instance)."""


@dataclass
class EnsembleDir:
    """Where a built ensemble keeps each part (see the module docstring)."""

    root: Path
    seeds: list[Path]
    fusion: dict
    fusion_dir: Path
    lantern: Path | None
    members: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, need_fusion: bool) -> EnsembleDir:
        from mer_ray.ensemble.artifacts import read_ensemble_config

        root = Path(root)
        base = root / "vanilla" / "models" / "vanilla"
        seeds = sorted(base.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 1 << 30)
        if not seeds:
            raise FileNotFoundError(f"{root}: no vanilla seed under {base} (is this a `mer ensemble` run directory?)")
        fdir = root / "report" / "fusion"
        fusion = read_ensemble_config(fdir)
        if need_fusion and not fusion:
            raise FileNotFoundError(f"{root}: no fitted fusion in {fdir} (the ensemble is not finished); "
                                    "use --no-llm for the vanilla seed average")
        lantern = root / "lantern"
        members = {m: root / m for m in fusion.get("members", [])}
        return cls(root, seeds, fusion, fdir, lantern if (lantern / "job.json").exists() else None, members)


def read_corpus(manifest: str | Path, split: str | None) -> pa.Table:
    """The manifest's rows (all of ``split`` when given), sorted by ``(dialogue_id, turn)``; gold kept for counts."""
    from mer_ray.data.loaders import load_manifest

    table = load_manifest(manifest)
    if split is not None:
        if "split" not in table.column_names or table["split"].null_count == table.num_rows:
            raise ValueError(f"{manifest} has no `split` column; drop --split")
        table = table.filter(pc.equal(table["split"], split))
        if not table.num_rows:
            raise ValueError(f"no rows with split={split!r} in {manifest}")
    return table


def _keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist()))


def _prefixed(keys):
    """Keys as :func:`~mer_ray.ensemble.align.read_member` rewrites ids (``<split>/`` added where there is no ``/``)."""
    return [(d if "/" in d else f"{LLM_SPLIT}/{d}", t) for d, t in keys]


def _align(table: pa.Table, keys, labels, where: str) -> np.ndarray:
    from mer_ray.ensemble.align import align

    return align(table, LLM_SPLIT, _prefixed(keys), labels, where=where)


def vanilla_seeds(ens: EnsembleDir, table: pa.Table, labels: list[str] | None = None):
    """Each seed's prediction table and ``{vanilla_<seed>: [N, C]}`` in ``table``'s row and ``labels`` order."""
    from mer_ray.vanilla.predict import VanillaPredictor

    tables, probs = {}, {}
    for d in ens.seeds:
        t = VanillaPredictor.from_dir(d).predictions_table(table)
        labels = labels or json.loads(t.schema.metadata[b"emotion_labels"])
        tables[d.name] = t
        probs[f"vanilla_{d.name}"] = _align(t, _keys(table), labels, f"vanilla {d}")
    return tables, probs, labels


def _dialogues(table: pa.Table):
    from mer_ray.mllm.examples import Dialogue

    out: dict[str, Dialogue] = {}
    for r in table.select(["dialogue_id", "turn", "speaker", "text"]).to_pylist():
        r["speaker"], r["text"] = r["speaker"] or "", r["text"] or ""
        out.setdefault(r["dialogue_id"], Dialogue(r["dialogue_id"], [], [])).rows.append(r)
        out[r["dialogue_id"]].feats.append({})  # no feature store for another corpus: text-only prompts
    return list(out.values())


def llm_member(name: str, model_dir: Path, table: pa.Table, vanilla_avg: np.ndarray, labels: list[str],
               work: Path, batch_size: int) -> np.ndarray:
    """A fine-tuned LLM member's ``[N, C]`` on ``table`` (cached in ``work``); references = the seed average."""
    path = work / "members" / f"{name}.parquet"
    keys = _keys(table)
    if path.exists():  # the cache is this corpus's when it covers exactly these rows
        cached = pq.read_table(path)
        if sorted(_keys(cached)) == sorted(keys):
            return _align(cached, keys, labels, f"member {name!r} ({path})")
    from mer_ray.mllm.predict import MLLMPredictor, predict_table

    pred = MLLMPredictor.from_dir(model_dir, batch_size=batch_size)
    refs = None
    if pred.prompt.references:  # Lantern x FARCER reads the vanilla seed average, in its own label order
        perm = [labels.index(lab) for lab in pred.labels]
        refs = {k: vanilla_avg[i, perm] for i, k in enumerate(keys)}
    out = predict_table(pred, _dialogues(table), LLM_SPLIT, None, refs)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    return _align(out, keys, labels, f"member {name!r} ({model_dir})")


def lantern_outputs(ens: EnsembleDir, reference: pa.Table, labels: list[str], work: Path,
                    cfg: CorpusPredictConfig) -> pa.Table:
    """Run (or resume) the Lantern prompt job with the ensemble's settings on a local Ray; its outputs."""
    import ray

    from mer_ray.ensemble.experiment import load_lantern
    from mer_ray.lantern.config import PromptJobConfig
    from mer_ray.lantern.prompt import prompt_main
    from mer_ray.runtime import start_ray

    job = json.loads((ens.lantern / "job.json").read_text())
    fitted = ens.fusion.get("lantern_job") or {}
    for key, val in fitted.items():  # the fusion learned these fields' features: the prompts must be the same
        if val is not None and job.get(key) != val:
            raise ValueError(f"{ens.lantern / 'job.json'}: {key}={job.get(key)!r}, the fusion was fitted with {val!r}")
    ldir, ref = work / "lantern", work / "lantern_reference.parquet"
    reference = reference.set_column(4, "split", pa.array([LLM_SPLIT] * reference.num_rows))
    if ref.exists() and not pq.read_table(ref).equals(reference) and ldir.exists():
        shutil.rmtree(ldir)  # finished parts belong to another corpus or model: never reuse them
    ref.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(reference, ref)
    pcfg = PromptJobConfig(vanilla=str(ref), out=str(ldir), splits=[LLM_SPLIT], sizes=job["sizes"], stride=job["stride"],
                           template=job["template"], few_shot=job.get("few_shot", 0), seed=job.get("seed", 0),
                           backend=job["backend"], actors=cfg.lantern_actors, ray_cpus=cfg.ray_cpus)
    started = start_ray(cfg.ray_cpus, address=cfg.address)
    try:
        summary = prompt_main(pcfg)
    finally:
        if started:
            ray.shutdown()
    if summary.get("missing"):
        log.warning("Lantern: %s queries failed or are missing; those utterances fall back", summary["missing"])
    return load_lantern(ldir, labels)[0]


def apply_fusion(ens: EnsembleDir, keys, vanilla: dict[str, np.ndarray], members: dict[str, np.ndarray],
                 llm: pa.Table | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The saved fusion on these inputs ``[N, C]``, and Lantern alone where it ran."""
    from mer_ray.ensemble import combine as E
    from mer_ray.ensemble.artifacts import read_ensemble_weights
    from mer_ray.lantern.model import FusionConfig, build_fusion

    cfg = ens.fusion
    # assemble needs dialogue-grouped, turn-sorted keys: the manifest's sort order is that
    inp = E.SplitInputs(list(keys), vanilla, members, llm, None)
    extra = {"lantern": E.lantern_alone(inp)} if llm is not None else {}
    state = read_ensemble_weights(ens.fusion_dir)
    if cfg.get("mode") == "vanilla" or state is None:
        return inp.vanilla_avg, extra
    model = build_fusion(FusionConfig(n_classes=len(cfg["labels"]), n_features=cfg["n_features"],
                                      hidden=cfg["setting"].get("hidden", 16)))
    model.load_state_dict(state)
    data = E.fusion_data(inp, cfg["lantern"], cfg["members"], cfg["calibrated"])
    return E.F.predict(model.eval(), data), extra


def predict_corpus(cfg: CorpusPredictConfig) -> dict:
    """Predict every row of the manifest with the ensemble and write ``cfg.out``; returns a summary."""
    lmap: LabelMap | None = read_label_map(cfg.label_map) if cfg.label_map else None
    ens = EnsembleDir.open(cfg.models, need_fusion=cfg.llm)
    corpus = read_corpus(cfg.manifest, cfg.split)
    n_unlabelled = sum(1 for v in corpus["label"].to_pylist() if v in (None, ""))
    table = strip_gold(corpus)  # nothing below sees a gold column
    keys = _keys(table)
    labels = list(ens.fusion["labels"]) if ens.fusion else None
    seed_tables, vanilla, labels = vanilla_seeds(ens, table, labels)
    if lmap is not None:
        lmap.projection(labels)  # unknown model labels fail now, before the LLM work
    work = Path(cfg.work_dir) if cfg.work_dir else Path(f"{cfg.out}.work")
    avg = np.mean(np.stack(list(vanilla.values())), axis=0)
    cols: dict[str, np.ndarray] = {**vanilla, "vanilla_avg": avg}
    fused, used, lantern_state = avg, [], "not used"
    if cfg.llm and ens.fusion.get("mode") != "vanilla":  # a fusion that selected vanilla needs no LLM
        members = {}
        for m, d in ens.members.items():
            members[m] = llm_member(m, d, table, avg, labels, work, cfg.batch_size)
        llm = None
        if ens.fusion.get("lantern"):
            if not cfg.lantern or ens.lantern is None:
                lantern_state = "skipped: its candidates are masked, the fusion falls back to the other members"
                log.warning("Lantern %s", lantern_state)
            else:
                ref_seed = Path(json.loads((ens.lantern / "job.json").read_text()).get("vanilla") or "").name
                ref = seed_tables.get(ref_seed, next(iter(seed_tables.values())))  # the seed the job prompted from
                llm = lantern_outputs(ens, ref, labels, work, cfg)
                lantern_state = "used"
        fused, extra = apply_fusion(ens, keys, vanilla, members, llm)
        cols.update(members)
        cols.update(extra)
        used = list(members) + (["lantern"] if llm is not None else [])
    out_labels = list(lmap.targets) if lmap else labels
    mapped = (lambda p: lmap.apply(p, labels)) if lmap else (lambda p: np.asarray(p, dtype=np.float64))
    probs = mapped(fused)
    out = table.select([c for c in KEY_COLUMNS if c in table.column_names])
    for c in KEY_COLUMNS:
        if c not in out.column_names:
            out = out.append_column(c, pa.nulls(out.num_rows, pa.string()))
    out = out.select(list(KEY_COLUMNS))
    out = out.append_column("emotion_probs", pa.array(list(probs.astype(np.float32)), F32))
    out = out.append_column("emotion_pred", pa.array([out_labels[i] for i in probs.argmax(1)], pa.string()))
    for name, p in cols.items():
        out = out.append_column(f"probs_{name}", pa.array(list(mapped(p).astype(np.float32)), F32))
    meta = {"emotion_labels": json.dumps(out_labels), "model": "ensemble" if cfg.llm else "vanilla seed average",
            "model_labels": json.dumps(labels), "label_map": json.dumps(lmap.sources if lmap else None),
            "members": json.dumps(used), "lantern": lantern_state,
            "fusion": json.dumps(ens.fusion.get("selected") if cfg.llm else None), "models": str(cfg.models)}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out.replace_schema_metadata(meta), cfg.out)
    return {"rows": out.num_rows, "unlabelled_rows": n_unlabelled, "labels": out_labels, "members": used,
            "lantern": lantern_state, "out": str(cfg.out)}
