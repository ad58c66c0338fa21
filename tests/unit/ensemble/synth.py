"""Synthetic inputs for the ensemble tests: vanilla seeds, an LLM member and a tiny Lantern prompt job.

Gold is drawn per utterance; each source is right with its own probability, otherwise it
guesses uniformly; its distribution puts most mass on its guess. Files follow the vanilla
prediction contract (no gold columns).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.lantern.job import RESULT_SCHEMA
from mer_ray.lantern.queries import CF_DIALOGUE

LABELS = ["neutral", "joy", "sadness", "anger"]
C = len(LABELS)
SETTINGS = {"raw_short": {"calibrated": False, "weight_decay": 1e-2, "steps": 60},
            "cal_short": {"calibrated": True, "weight_decay": 1e-2, "steps": 60}}


def gold(n_dialogues: int = 24, n_turns: int = 5, seed: int = 0) -> dict[str, dict]:
    """``{split: {(dialogue_id, turn): label}}``; dialogues have 3..n_turns turns (``turn`` gaps kept)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for split in ("dev", "test"):
        g = {}
        for d in range(n_dialogues):
            for t in range(int(rng.integers(3, n_turns + 1))):
                g[(f"{split}/{d}", 2 * t)] = LABELS[int(rng.integers(C))]
        out[split] = g
    return out


def distributions(g: dict, quality: float, rng: np.random.Generator) -> dict:
    """``{key: probs [C]}``: right with probability ``quality``."""
    out = {}
    for k, lab in g.items():
        y = LABELS.index(lab)
        guess = y if rng.random() < quality else int(rng.integers(C))
        p = rng.dirichlet(np.ones(C)) * 0.3
        p[guess] += 0.7
        out[k] = p / p.sum()
    return out


def write_member(path: Path, probs: dict, split: str, labels=LABELS, meta: dict | None = None,
                 extra_cols: dict | None = None, order=None) -> Path:
    """A prediction file in the vanilla contract; columns permuted to ``labels``' order."""
    keys = list(probs) if order is None else order
    perm = [LABELS.index(lab) for lab in labels] if set(labels) == set(LABELS) else list(range(C))
    rows = {"dialogue_id": [k[0] for k in keys], "turn": [k[1] for k in keys], "speaker": ["A"] * len(keys),
            "text": ["hi"] * len(keys), "split": [split] * len(keys),
            "emotion_probs": pa.array([np.asarray(probs[k])[perm].astype(np.float32).tolist() for k in keys],
                                      pa.list_(pa.float32())),
            "emotion_pred": [labels[int(np.argmax(np.asarray(probs[k])[perm]))] for k in keys], **(extra_cols or {})}
    t = pa.table(rows).replace_schema_metadata({"emotion_labels": json.dumps(list(labels)), **(meta or {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path)
    return path


def write_lantern(out: Path, g: dict[str, dict], quality: float, vanilla_dir: Path, seed: int = 0) -> Path:
    """A finished prompt job: size-2 fields (stride 2) and the whole dialogue, plus the content-free query."""
    rng = np.random.default_rng(seed)
    q = {c: [] for c in ("query_id", "split", "dialogue_id", "field_size", "field_start", "field_end", "target_pos",
                         "target_turn", "dialogue_len", "prompt")}
    res = {f.name: [] for f in RESULT_SCHEMA}

    def add(split, d, size, start, end, pos, turn, n, probs):
        qid = f"{d}|{start}-{end}|{pos}"
        for c, v in zip(q, (qid, split, d, size, start, end, pos, turn, n, "prompt")):
            q[c].append(v)
        for c, v in zip(res, (qid, "ok", None, np.asarray(probs, np.float32).tolist(), None, 1, 1, 0, 0.0)):
            res[c].append(v)

    for split, gs in g.items():
        by_dia: dict[str, list] = {}
        for (d, t), lab in sorted(gs.items(), key=lambda kv: kv[0][1]):
            by_dia.setdefault(d, []).append((t, lab))
        for d, rows in by_dia.items():
            n = len(rows)
            fields = [(2, s, min(s + 2, n)) for s in range(0, n, 2)] + [(None, 0, n)]
            for size, s, e in fields:
                for pos in range(s, e):
                    p = distributions({0: rows[pos][1]}, quality, rng)[0]
                    add(split, d, size, s, e, pos, rows[pos][0], n, p)
    add(None, CF_DIALOGUE, None, 0, 1, 0, None, 1, [0.4, 0.2, 0.2, 0.2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    types = {c: pa.int64() for c in ("field_size", "field_start", "field_end", "target_pos", "target_turn", "dialogue_len")}
    pq.write_table(pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in q.items()}), out / "queries.parquet")
    pq.write_table(pa.table({f.name: pa.array(res[f.name], f.type) for f in RESULT_SCHEMA}, schema=RESULT_SCHEMA),
                   out / "parts" / "part-0.parquet")
    (out / "job.json").write_text(json.dumps({"vanilla": str(vanilla_dir), "sizes": [2, None], "stride": 2,
                                              "template": "fake", "backend": {"kind": "fake", "model": "none"}}))
    return out


def write_inputs(root: Path, g: dict[str, dict], member_quality: float = 0.9, lantern_quality: float | None = 0.6,
                 seed: int = 0) -> dict:
    """Three vanilla seeds (quality 0.5), one member ``oracle`` (labels stored in another order) and,
    unless ``lantern_quality`` is None, a Lantern job. Returns :func:`run_ensemble`'s file arguments."""
    rng = np.random.default_rng(seed + 1)
    vanilla = []
    for s in range(3):
        d = root / "vanilla" / f"seed{s}"
        for split in ("dev", "test"):
            write_member(d / f"predictions_{split}.parquet", distributions(g[split], 0.5, rng), split,
                         meta={"seed": str(s)})
        vanilla.append(d)
    members = {"oracle": {}}
    for split in ("dev", "test"):
        members["oracle"][split] = write_member(root / "oracle" / f"{split}.parquet",
                                                distributions(g[split], member_quality, rng), split,
                                                labels=LABELS[::-1])
    lantern = None if lantern_quality is None else write_lantern(root / "lantern", g, lantern_quality, vanilla[0], seed)
    return {"vanilla": vanilla, "lantern_dir": lantern, "members": members}
