"""Where the dev and test distributions to calibrate come from, by distribution name.

- An ``mer ensemble`` run directory: ``report/{dev,test}_predictions.parquet`` (``probs_<row>``; the
  fused rows are out-of-fold on dev). ``final_llm`` is ``ensemble``, ``final_no_llm`` and ``vanilla``
  are ``vanilla_avg``, ``llm`` is ``lantern`` (Lantern alone: the mean over its fields, what the
  API's ``llm`` field shows); every other LLM member keeps its own name (``farcer``, ...).
- A plain models dir (``mer demo``, ``mer pipeline``): the vanilla prediction files beside it
  (``../predictions/predictions_<split>.parquet``, or the mean of ``../predictions/seed*/``), and,
  when it has a Lantern ``fusion/``, the prompt job's outputs (``../lantern/prompts``). The fusion
  was fitted on dev and saves no dev predictions, so its dev rows are cross-fitted here exactly as
  ``mer lantern fuse`` selected it (same folds, seed and setting); test uses the saved fusion.

Gold labels come from MELD's CSVs, a manifest, or a ``{split: {(dialogue_id, turn): label}}`` dict;
they are used for fitting (dev) and scoring (test) only.

Shapes: ``N`` utterances of a split, ``C`` model labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

Key = tuple[str, int]
SPLITS = ("dev", "test")
#: Distribution name -> ``probs_<column>`` of an ensemble run's prediction tables.
ENSEMBLE_COLUMNS = {"final_llm": "ensemble", "final_no_llm": "vanilla_avg", "vanilla": "vanilla_avg", "llm": "lantern"}
UNCALIBRATED = "uncalibrated_"
"""Prefix of a kept uncalibrated copy, ``uncalibrated_probs_<row>``: a prefix, not a suffix, so no extra column starts
with ``probs_`` (the evidence contract: every ``probs_*`` column is a scored row, none but the seeds starts ``probs_vanilla``)."""


@dataclass
class SplitData:
    """One split: row keys, gold indices [N] and ``{name: [N, C]}`` (NaN rows: no value there)."""

    keys: list[Key]
    y: np.ndarray
    probs: dict[str, np.ndarray]

    @property
    def groups(self) -> np.ndarray:
        """[N] dialogue ids."""
        return np.array([k[0] for k in self.keys])


@dataclass
class Sources:
    """The distributions of one models dir on dev (and test), with where each came from."""

    labels: list[str]
    dev: SplitData
    test: SplitData | None
    columns: dict[str, str] = field(default_factory=dict)
    """Name -> what it is read from (names sharing a source are one distribution, e.g. vanilla = final_no_llm)."""
    provenance: dict = field(default_factory=dict)
    """``fitted_on`` material: kind, files, and per distribution its source and whether it is out of fold."""


def is_ensemble_run(models_dir: str | Path) -> bool:
    """True when ``models_dir`` holds an ``mer ensemble`` report with dev predictions."""
    return (Path(models_dir) / "report" / "dev_predictions.parquet").exists()


# --- gold


def gold_from_meld(meld: str | Path | None, splits: Sequence[str] = SPLITS) -> dict[str, dict[Key, str]]:
    """``{split: {(dialogue_id, turn): label}}`` from MELD's CSVs (``None``: ``$MER_MELD_DIR``)."""
    from mer_ray.data.loaders import load_meld, meld_dir

    return {s: gold_from_table(load_meld(meld_dir(meld), s))[s] for s in splits}


def gold_from_table(table: pa.Table, split: str | None = None) -> dict[str, dict[Key, str]]:
    """Gold of a loaded dataset table (``dialogue_id``, ``turn``, ``label``, ``split``); null labels are skipped."""
    cols = [table[c].to_pylist() for c in ("dialogue_id", "turn", "label")]
    splits = table["split"].to_pylist() if "split" in table.column_names else [split] * table.num_rows
    out: dict[str, dict[Key, str]] = {}
    for d, t, lab, s in zip(*cols, splits):
        if lab is not None:
            out.setdefault(s, {})[(d, t)] = lab
    return out


def gold_indices(keys: Sequence[Key], gold: dict[Key, str], labels: Sequence[str], where: str) -> np.ndarray:
    """[N] indices into ``labels`` of each key's gold label; ValueError naming ``where`` for missing or unknown gold."""
    missing = [k for k in keys if k not in gold]
    if missing:
        raise ValueError(f"{where}: {len(missing)} rows have no gold label (first {missing[0]})")
    bad = sorted({gold[k] for k in keys} - set(labels))
    if bad:
        raise ValueError(f"{where}: gold labels {bad} are not among the model's labels {list(labels)}")
    return np.array([list(labels).index(gold[k]) for k in keys], dtype=np.int64)


def _probs(table: pa.Table, col: str) -> np.ndarray:
    return np.asarray(table[col].to_pylist(), dtype=np.float64)


# --- an `mer ensemble` run


def ensemble_sources(run_dir: str | Path, gold: dict[str, dict[Key, str]] | None = None,
                     meld: str | Path | None = None, splits: Sequence[str] = SPLITS) -> Sources:
    """The distributions of an ``mer ensemble`` run (``report/*_predictions.parquet``).

    A column already rewritten as calibrated (``uncalibrated_probs_<row>`` beside it) is read from its
    uncalibrated copy, so calibrating twice starts from the same numbers.
    """
    rep = Path(run_dir) / "report"
    report = json.loads((rep / "report.json").read_text())
    labels = list(report["labels"])
    gold_from = "given" if gold is not None else f"MELD CSVs ({meld or '$MER_MELD_DIR'})"
    gold = gold if gold is not None else gold_from_meld(meld, splits)
    names = {**ENSEMBLE_COLUMNS, **{m: m for m in report.get("members", []) if m != "lantern"}}
    out, files = {}, {}
    for s in splits:
        path = rep / f"{s}_predictions.parquet"
        t = pq.read_table(path)
        own = json.loads((t.schema.metadata or {}).get(b"emotion_labels", json.dumps(labels)))
        if own != labels:
            raise ValueError(f"{path}: labels {own} differ from report.json's {labels}")
        keys = list(zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist()))
        probs = {}
        for name, col in names.items():
            c = f"{UNCALIBRATED}probs_{col}" if f"{UNCALIBRATED}probs_{col}" in t.column_names else f"probs_{col}"
            if c in t.column_names:
                probs[name] = _probs(t, c)
        out[s] = SplitData(keys, gold_indices(keys, gold[s], labels, str(path)), probs)
        files[s] = str(path)
    names = {n: c for n, c in names.items() if n in out[splits[0]].probs}
    fused = "fusion of the vanilla seed average and the LLM members, cross-fitted over dev dialogues " \
            f"({report.get('folds', '?')} folds, seed {report.get('fold_seed', '?')}): out-of-fold dev predictions " \
            "of the setting selected on those folds"
    how = {"ensemble": fused, "vanilla_avg": "mean of the vanilla seeds, trained on train (each seed's epoch selected on dev)",
           "lantern": "zero-shot LLM, mean over the receptive fields covering an utterance (not fitted)"}
    dist = {n: {"column": f"probs_{c}", "out_of_fold": True, "how": how.get(c, "LLM fine-tuned on train, not fitted on dev")}
            for n, c in names.items()}
    prov = {"kind": "ensemble_run", "models_dir": str(run_dir), "files": files, "distributions": dist, "gold": gold_from}
    return Sources(labels, out["dev"], out.get("test"), {n: f"probs_{c}" for n, c in names.items()}, prov)


# --- a plain models dir


def vanilla_files(models_dir: str | Path, split: str) -> list[Path]:
    """The vanilla prediction files of ``split`` beside a plain models dir (demo: one; pipeline: one per seed)."""
    root = Path(models_dir).parent / "predictions"
    one = root / f"predictions_{split}.parquet"
    if one.exists():
        return [one]
    return sorted(root.glob(f"seed*/predictions_{split}.parquet"), key=lambda p: p.parent.name)


def _mean_vanilla(paths: Sequence[Path]) -> tuple[pa.Table, list[str]]:
    """The seeds' mean ``emotion_probs`` as one vanilla prediction table (rows of the first file)."""
    tables = [pq.read_table(p) for p in paths]
    labels = json.loads(tables[0].schema.metadata[b"emotion_labels"])
    if len(tables) == 1:
        return tables[0], labels
    keys = [list(zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist())) for t in tables]
    if any(k != keys[0] for k in keys) or any(json.loads(t.schema.metadata[b"emotion_labels"]) != labels for t in tables):
        raise ValueError(f"vanilla seeds {[str(p) for p in paths]} predict different rows or labels")
    mean = np.mean([_probs(t, "emotion_probs") for t in tables], axis=0)
    t = tables[0]
    t = t.set_column(t.schema.get_field_index("emotion_probs"), "emotion_probs",
                     pa.array(list(mean.astype(np.float32)), pa.list_(pa.float32())))
    return t, labels


def _by_key(keys: Sequence[Key], data_keys: Sequence[Key], probs: np.ndarray) -> np.ndarray:
    """``probs`` [M, C] in ``data_keys`` order -> [N, C] in ``keys`` order, NaN where a key has none."""
    idx = {k: i for i, k in enumerate(data_keys)}
    out = np.full((len(keys), probs.shape[1]), np.nan)
    for i, k in enumerate(keys):
        if k in idx:
            out[i] = probs[idx[k]]
    return out


def models_dir_sources(models_dir: str | Path, gold: dict[str, dict[Key, str]], *,
                       vanilla: dict[str, Sequence[str | Path]] | None = None, lantern: str | Path | None = None,
                       splits: Sequence[str] = SPLITS) -> Sources:
    """The distributions of a plain models dir (``vanilla/``, optional ``fusion/``).

    Args:
        models_dir: the directory Serve reads.
        gold: ``{split: {(dialogue_id, turn): label}}``.
        vanilla: ``{split: [prediction files]}`` (several: the seeds, averaged); default :func:`vanilla_files`.
        lantern: the Lantern prompt job's output dir (default ``../lantern/prompts`` when ``fusion/`` exists).
        splits: ``dev`` first; ``test`` is optional.
    """
    from mer_ray.lantern import artifacts as lantern_artifacts

    models_dir = Path(models_dir)
    vanilla = vanilla or {s: vanilla_files(models_dir, s) for s in splits}
    splits = [s for s in splits if vanilla.get(s) and s in gold]
    if "dev" not in splits:
        raise FileNotFoundError(f"{models_dir}: no dev vanilla predictions found (looked in {models_dir.parent / 'predictions'})")
    fusion = lantern_artifacts.read_meta(models_dir / "fusion")
    prompts = Path(lantern) if lantern else (models_dir.parent / "lantern" / "prompts" if fusion else None)
    if fusion and not (prompts and (prompts / "queries.parquet").exists()):
        raise FileNotFoundError(f"{models_dir}/fusion is a Lantern fusion, but its prompt job's outputs are not at "
                                f"{prompts}; pass the prompt job's --out directory")
    out, files = {}, {}
    labels: list[str] = []
    for s in splits:
        table, labels = _mean_vanilla([Path(p) for p in vanilla[s]])
        keys = list(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist()))
        van = _probs(table, "emotion_probs")
        probs = {"final_no_llm": van, "vanilla": van}
        if fusion:
            probs.update(_lantern(table, keys, labels, prompts, fusion, models_dir / "fusion", gold[s], s))
        out[s] = SplitData(keys, gold_indices(keys, gold[s], labels, f"{vanilla[s][0]}"), probs)
        files[s] = [str(p) for p in vanilla[s]]
    n_seeds = len(vanilla["dev"])
    how = "trained on train, not fitted on dev (epoch selected on dev)" + (f"; mean of {n_seeds} seeds" if n_seeds > 1 else "")
    dist = {"final_no_llm": {"files": files, "out_of_fold": True, "how": how}, "vanilla": {"files": files, "out_of_fold": True, "how": how}}
    if fusion:
        dist["final_llm"] = {"out_of_fold": True, "cross_fitted_here": fusion.get("mode") == "fusion",
                             "how": (f"Lantern fusion ({fusion.get('selected')}) cross-fitted on dev here: {fusion.get('folds', 5)} "
                                     f"folds over dialogues, seed {fusion.get('seed', 0)}, as mer lantern fuse selected it"
                                     if fusion.get("mode") == "fusion" else "fusion selected vanilla-only: the vanilla model")}
        dist["llm"] = {"files": str(prompts), "out_of_fold": True, "how": "mean LLM distribution over the fields that scored (not fitted)"}
    if (models_dir / "mllm").exists():
        # Serve mixes the MLLM in only with use_mllm (off by default) and nothing here predicts it on dev
        dist["mllm"] = {"calibrated": False, "why": "no dev predictions for <models>/mllm; final_* are fitted without the MLLM mix"}
    cols = {"final_no_llm": "vanilla", "vanilla": "vanilla", "final_llm": "fusion", "llm": "lantern llm"}
    names = set(out["dev"].probs)
    prov = {"kind": "models_dir", "models_dir": str(models_dir), "files": files, "distributions": dist}
    return Sources(labels, out["dev"], out.get("test"), {n: c for n, c in cols.items() if n in names}, prov)


def _lantern(table: pa.Table, keys: list[Key], labels: list[str], prompts: Path, meta: dict, fusion_dir: Path,
             gold: dict[Key, str], split: str) -> dict[str, np.ndarray]:
    """``final_llm`` (the fusion; cross-fitted on dev, the saved one on test) and ``llm`` (the LLM alone) [N, C]."""
    import pyarrow.compute as pc

    from mer_ray.lantern import fit as F
    from mer_ray.lantern.job import load_llm_outputs
    from mer_ray.lantern.predict import FusionPredictor

    llm = load_llm_outputs(prompts)
    # the dialogues the prompt job covered, as `mer lantern fuse` fitted on (the rest get no fused value here)
    covered = pa.array(sorted(set(llm["dialogue_id"].to_pylist())))
    van = table.filter(pc.is_in(table["dialogue_id"], covered))
    raw = F.assemble(van, llm, calibrated=False, gold=gold, labels=labels)
    data = F.assemble(van, llm, calibrated=bool(meta.get("calibrated")), gold=gold, labels=labels)
    dkeys = list(zip(data.dialogue_id, data.turn))
    if meta.get("mode") != "fusion":
        fused = data.vanilla.numpy()
    elif split == "dev":
        hp = {k: v for k, v in meta["setting"].items() if k != "calibrated"}
        fused = F.cross_fit(data, {"f": hp}, k=meta.get("folds", 5), seed=meta.get("seed", 0))["f"]
    else:
        fused = F.predict(FusionPredictor.from_dir(fusion_dir).model, data)
    alone = raw.llm_only()
    alone[~raw.mask.any(1).numpy()] = np.nan  # the API's `llm` is null where no field scored
    return {"final_llm": _by_key(keys, dkeys, np.asarray(fused, dtype=np.float64)),
            "llm": _by_key(keys, dkeys, np.asarray(alone, dtype=np.float64))}


def load_sources(models_dir: str | Path, *, meld: str | Path | None = None, manifest: str | Path | None = None,
                 gold: dict[str, dict[Key, str]] | None = None, lantern: str | Path | None = None,
                 vanilla: dict[str, Sequence[str | Path]] | None = None) -> Sources:
    """The sources of any models dir. Gold: ``gold``, else ``manifest``, else the demo's
    ``../corpus/manifest.jsonl`` when there is one, else MELD (``meld`` or ``$MER_MELD_DIR``)."""
    from mer_ray.data.loaders import load_manifest

    models_dir = Path(models_dir)
    demo_manifest = models_dir.parent / "corpus" / "manifest.jsonl"
    if gold is None and (manifest or (demo_manifest.exists() and meld is None)):
        gold = gold_from_table(load_manifest(manifest or demo_manifest))
    if is_ensemble_run(models_dir):
        return ensemble_sources(models_dir, gold=gold, meld=meld)
    return models_dir_sources(models_dir, gold or gold_from_meld(meld), vanilla=vanilla, lantern=lantern)
