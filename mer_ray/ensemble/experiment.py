"""The MELD ensemble run: load and align members, fuse (fitted on dev only), write the evidence.

:func:`run_ensemble` reads the vanilla seeds, optionally a Lantern prompt-job
directory, and extra LLM members (FARCER, ...), all in the vanilla prediction
contract and aligned by ``(dialogue_id, turn)``; fuses the vanilla seed average
with each LLM member and with all of them (cross-fitted on dev dialogues,
selected on held-out folds, refit on dev, applied to test once); and writes the
prediction tables, ``report.json``/``report.md``/``ablation.png`` and the
fitted ensemble fusion (``fusion/``). Plain functions, no Ray.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mer_ray.data.leak import assert_no_gold
from mer_ray.ensemble import combine as E
from mer_ray.ensemble.align import align, member_labels, seed_name, split_keys, vanilla_paths
from mer_ray.ensemble.artifacts import write_ensemble_fusion
from mer_ray.ensemble.evidence import build_ensemble_report
from mer_ray.lantern.fit import content_free_probs
from mer_ray.lantern.model import FEATURES

log = logging.getLogger(__name__)
SPLITS = ("dev", "test")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def load_gold(meld: str | Path | None, splits: Sequence[str] = SPLITS) -> dict[str, dict]:
    """``{split: {(dialogue_id, turn): label}}`` from MELD's CSVs (``None``: ``$MER_MELD_DIR``)."""
    from mer_ray.data.loaders import load_meld, meld_dir

    out = {}
    for s in splits:
        g = load_meld(meld_dir(meld), s)
        out[s] = dict(zip(zip(g["dialogue_id"].to_pylist(), g["turn"].to_pylist()), g["label"].to_pylist()))
    return out


def _check_member_names(members: Sequence[str], lantern: bool) -> None:
    for m in members:
        if not NAME.match(m) or m.startswith(("vanilla", "fused_")) or m == "ensemble" or (lantern and m == "lantern"):
            raise ValueError(f"bad member name {m!r}: lower-case [a-z0-9_], not vanilla*, fused_*, ensemble"
                             + (" or lantern (the Lantern job's name)" if lantern else ""))


def load_lantern(lantern_dir: str | Path, labels: Sequence[str]):
    """The prompt job's outputs with ``llm_probs`` in ``labels`` order, and its ``job.json``.

    The LLM scored the labels of the vanilla file the job prompted from (``job.json``'s ``vanilla``);
    where that file is readable its label order is mapped onto ``labels``.
    """
    import pyarrow as pa

    from mer_ray.lantern.job import load_llm_outputs

    d = Path(lantern_dir)
    job = json.loads((d / "job.json").read_text()) if (d / "job.json").exists() else {}
    llm = load_llm_outputs(d)
    assert_no_gold(llm, f"the ensemble (Lantern outputs {d})")
    src = vanilla_paths(job["vanilla"])["test"] if job.get("vanilla") else None
    if src is not None and src.exists():
        own = member_labels(pq.read_schema(src), str(src))
        if sorted(own) != sorted(labels):
            raise ValueError(f"{d}: the prompt job scored labels {own}, the ensemble uses {list(labels)}")
        if own != list(labels):
            perm = [own.index(lab) for lab in labels]
            probs = [None if p is None else [p[i] for i in perm] for p in llm["llm_probs"].to_pylist()]
            llm = llm.set_column(llm.schema.get_field_index("llm_probs"), "llm_probs", pa.array(probs, pa.list_(pa.float32())))
    return llm, job


def _fusion_config(res: E.FusionResult, labels, seeds, members, llm, job, k, seed) -> dict:
    cf = content_free_probs(llm) if llm is not None else None
    return {
        "labels": list(labels), "mode": "vanilla" if res.selected == "vanilla" else "fusion",
        "selected": res.selected, "setting": {**res.setting, "hidden": 16},
        "calibrated": bool(res.setting.get("calibrated", False)),
        "vanilla_seeds": list(seeds), "vanilla_input": "mean of the vanilla seeds' emotion_probs",
        "lantern": res.lantern, "members": list(res.members), "sources": res.sources,
        "candidate_order": "Lantern's fields (sorted by span, then start), then one whole-dialogue candidate per member",
        "features": E.feature_names(res.sources) if res.sources else list(FEATURES), "n_features": res.n_features,
        "n_classes": len(labels), "content_free": None if cf is None else cf.tolist(), "folds": k, "seed": seed,
        "lantern_job": {key: job.get(key) for key in ("sizes", "stride", "template")} if res.lantern else None,
        # the LLM Lantern's candidates came from: serving must prompt the same one
        "backend": ({a: b for a, b in (job.get("backend") or {}).items() if a in ("kind", "model")} or None)
        if res.lantern else None,
        "member_files": members,
    }


def run_ensemble(vanilla: Sequence[str | Path | dict], lantern_dir: str | Path | None,
                 members: dict[str, dict[str, str | Path]], meld_dir: str | Path | None, out_dir: str | Path,
                 wall_s: dict | None = None, *, gold: dict[str, dict] | None = None,
                 settings: dict[str, dict] | None = None, k: int = 5, seed: int = 0, n_boot: int = 1000) -> dict:
    """Fuse vanilla seeds, Lantern and extra LLM members on MELD; fit on dev, report on test.

    Args:
        vanilla: one entry per seed: a ``predictions_{dev,test}.parquet`` directory, a file with both
            splits, or ``{split: file}``.
        lantern_dir: a Lantern prompt-job output directory covering dev and test (``None``: no Lantern).
        members: extra LLM member name -> ``{split: Parquet file}`` (vanilla prediction contract).
        meld_dir: MELD directory for gold labels (``None``: ``$MER_MELD_DIR``); unused with ``gold``.
        out_dir: receives the evidence (see :func:`~mer_ray.ensemble.evidence.build_ensemble_report`)
            and ``fusion/`` (the fitted full-ensemble fusion).
        wall_s: the caller's step timings, merged into ``report.json``.
        gold: ``{split: {(dialogue_id, turn): label}}`` replacing MELD's gold (tests, other corpora).
        settings: fusion grid (default: Lantern's :data:`~mer_ray.lantern.fuse.SETTINGS`).
        k: cross-fitting folds over dev dialogues.
        seed: fold and fitting seed.
        n_boot: bootstrap resamples over test dialogues.

    Returns:
        The report dict (``report.json``).
    """
    from mer_ray.lantern.fuse import SETTINGS

    t0 = time.perf_counter()
    out = Path(out_dir)
    grid = dict(settings or SETTINGS)
    use_lantern = lantern_dir is not None
    _check_member_names(list(members), use_lantern)
    if not use_lantern and not members:
        raise ValueError("no LLM member: give lantern_dir or members")
    gold = gold or load_gold(meld_dir)
    paths = [vanilla_paths(v) for v in vanilla]
    if not paths:
        raise ValueError("no vanilla seed given")
    seeds = [seed_name(p["test"], i) for i, p in enumerate(paths)]
    if len(set(seeds)) != len(seeds):  # e.g. files without seed metadata mixed with ones that have it
        seeds = [f"vanilla_seed{i}" for i in range(len(paths))]
    labels = member_labels(pq.read_schema(paths[0]["test"]), str(paths[0]["test"]))
    llm, job = load_lantern(lantern_dir, labels) if use_lantern else (None, {})

    inputs, y = {}, {}
    for s in SPLITS:
        keys = split_keys(gold[s])
        unknown = sorted({gold[s][key] for key in keys} - set(labels))
        if unknown:
            raise ValueError(f"{s} gold labels {unknown} are not in the vanilla labels {labels}")
        y[s] = np.array([labels.index(gold[s][key]) for key in keys])
        van = {n: align(p[s], s, keys, labels) for n, p in zip(seeds, paths)}
        mem = {m: align(f[s], s, keys, labels, where=f"member {m!r} ({f[s]})") for m, f in members.items()}
        # test gold stays out of SplitInputs: fitting can only ever see dev's y
        inputs[s] = E.SplitInputs(keys, van, mem, llm, y[s] if s == "dev" else None)
    t_load = time.perf_counter() - t0
    for s in SPLITS if use_lantern else ():
        cov = E.lantern_coverage(inputs[s])
        if cov < 1.0:  # an unfinished prompt job: those utterances get vanilla_avg for Lantern
            log.warning("Lantern candidates cover %.1f%% of %s utterances (%s)", 100 * cov, s, lantern_dir)

    llm_members = (["lantern"] if use_lantern else []) + list(members)
    cols: dict[str, dict[str, np.ndarray]] = {s: {**inputs[s].vanilla, "vanilla_avg": inputs[s].vanilla_avg} for s in SPLITS}
    for s in SPLITS:
        if use_lantern:
            cols[s]["lantern"] = E.lantern_alone(inputs[s])
        cols[s].update(inputs[s].members)
    fused: dict[str, E.FusionResult] = {}
    for m in llm_members:
        lan = m == "lantern"
        fused[f"fused_{m}"] = E.fuse(f"fused_{m}", inputs["dev"], inputs["test"], labels, lan,
                                     [] if lan else [m], grid, k, seed)
    if len(llm_members) > 1:
        fused["ensemble"] = E.fuse("ensemble", inputs["dev"], inputs["test"], labels, use_lantern, list(members),
                                   grid, k, seed)
    else:  # one LLM member: the ensemble is that member's fusion
        fused["ensemble"] = fused[f"fused_{llm_members[0]}"]
    for name, res in fused.items():
        cols["dev"][name], cols["test"][name] = res.dev_oof, res.test
    t_fit = time.perf_counter() - t0 - t_load

    ens = fused["ensemble"]
    member_files = {m: {s: str(f[s]) for s in SPLITS} for m, f in members.items()}
    config = _fusion_config(ens, labels, seeds, member_files, llm, job, k, seed)
    write_ensemble_fusion(out / "fusion", config, None if ens.model is None else ens.model.state_dict())
    selected = {n: {"selected": r.selected, "setting": r.setting, "sources": r.sources, "dev_heldout": r.dev_heldout}
                for n, r in fused.items()}
    extra = {"folds": k, "fold_seed": seed, "settings": grid,
             "lantern_coverage": {s: E.lantern_coverage(inputs[s]) for s in SPLITS} if use_lantern else None,
             "inputs": {"vanilla": [{s: str(p[s]) for s in SPLITS} for p in paths],
                        "lantern": None if lantern_dir is None else str(lantern_dir), "members": member_files},
             "fusion_dir": str(out / "fusion")}
    timings = {**(wall_s or {}), "ensemble_load": round(t_load, 3), "ensemble_fit": round(t_fit, 3)}
    keys = {s: inputs[s].keys for s in SPLITS}
    return build_ensemble_report(cols, y, keys, labels, out, seeds=seeds, members=llm_members, selected=selected,
                                 wall_s=timings, extra=extra, n_boot=n_boot, boot_seed=seed)
