"""Lantern queries: one (dialogue, receptive field, target utterance) prompt each.

Inputs are the vanilla model's prediction file (never gold: it is checked) and,
optionally, a train table for few-shot examples. Every utterance of a field is
listed with its speaker and the vanilla references (top-k emotion
probabilities, sentiment, VAD where present); the target is named after the
field, so all targets of one field share the prompt's prefix.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.data.fields import receptive_fields
from mer_ray.data.leak import assert_no_gold
from mer_ray.llm.prompts import PromptTemplate

#: Dialogue id of the content-free query (contextual calibration); never a real dialogue.
CF_DIALOGUE = "__content_free__"


def parse_sizes(spec: str | Sequence[int | str | None]) -> list[int | None]:
    """``"4,8,whole"`` -> ``[4, 8, None]`` (``whole``/``all``/``none``: the whole dialogue)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int | None] = []
    for it in items:
        s = str(it).strip().lower()
        if s in ("whole", "all", "none", "null"):
            out.append(None)
        elif s.isdigit() and int(s) > 0:
            out.append(int(s))
        else:
            raise ValueError(f"bad receptive-field size {it!r}: a positive int or 'whole'")
    if not out:
        raise ValueError("no receptive-field sizes given")
    return out


def size_name(size: int | None) -> str:
    return "whole" if size is None else str(size)


def read_vanilla(path: str | Path | pa.Table) -> tuple[pa.Table, list[str], list[str] | None]:
    """Read a vanilla prediction file; returns (table, emotion labels, sentiment labels or None).

    Raises:
        GoldLeakError: the file holds gold columns (a prediction file never does).
    """
    table = pq.read_table(path) if not isinstance(path, pa.Table) else path
    where = f"the Lantern prompt builder (vanilla predictions {path if not isinstance(path, pa.Table) else 'table'})"
    assert_no_gold(table, where)
    meta = table.schema.metadata or {}
    if b"emotion_labels" not in meta:
        raise ValueError(f"{path}: schema metadata lacks 'emotion_labels' (a JSON list); not a vanilla prediction file")
    emo = json.loads(meta[b"emotion_labels"])
    sent = json.loads(meta[b"sentiment_labels"]) if meta.get(b"sentiment_labels") else None
    for col in ("dialogue_id", "turn", "speaker", "text", "emotion_probs"):
        if col not in table.column_names:
            raise ValueError(f"{path}: missing column {col!r}")
    return table, emo, sent


def _refs(row: dict, emo: list[str], sent: list[str] | None, top_k: int) -> dict[str, Any]:
    p = np.asarray(row["emotion_probs"], dtype=np.float64)
    order = np.argsort(-p, kind="stable")[:top_k]
    out: dict[str, Any] = {"emotion_refs": [(emo[i], float(p[i])) for i in order]}
    sp = row.get("sentiment_probs")
    if sent and sp is not None:
        j = int(np.argmax(sp))
        out["sentiment"] = (sent[j], float(sp[j]))
    vad = row.get("vad")
    if vad is not None:
        out["vad"] = [float(v) for v in vad]
    return out


def dialogues(table: pa.Table) -> dict[str, list[dict]]:
    """Rows of each dialogue in turn order (dialogues in first-seen order)."""
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["dialogue_id"], []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r["turn"])
    return out


def prompt_context(rows: list[dict], start: int, end: int, target: int, labels: Sequence[str],
                   emo: list[str], sent: list[str] | None, top_k: int,
                   examples: list[dict] | None = None) -> dict[str, Any]:
    """The template context for the field ``rows[start:end]`` and target position ``target``."""
    utts = []
    for k, row in enumerate(rows[start:end]):
        u = {"idx": k + 1, "speaker": row["speaker"] or "Unknown", "text": row["text"] or ""}
        u.update(_refs(row, emo, sent, top_k))
        utts.append(u)
    return {
        "labels": list(labels), "utterances": utts, "target": utts[target - start],
        "examples": examples or [], "has_sentiment": any(u.get("sentiment") for u in utts),
        "has_vad": any(u.get("vad") for u in utts),
    }


def content_free_context(labels: Sequence[str], examples: list[dict] | None = None) -> dict[str, Any]:
    """A content-free input for contextual calibration (Zhao et al., 2021): one 'N/A' utterance."""
    u = {"idx": 1, "speaker": "N/A", "text": "N/A", "emotion_refs": []}
    return {"labels": list(labels), "utterances": [u], "target": u, "examples": examples or [],
            "has_sentiment": False, "has_vad": False}


def few_shot_examples(train: pa.Table, k: int, labels: Sequence[str], seed: int = 0,
                      n_context: int = 2, forbid_dialogues: set[str] | None = None) -> list[dict]:
    """``k`` labelled examples drawn from a *train* table, labels cycled for coverage.

    Raises:
        ValueError: the table is not train (its ``split`` column says otherwise) or shares
            dialogues with the split being predicted.
    """
    if k <= 0:
        return []
    if "split" in train.column_names and set(train["split"].to_pylist()) != {"train"}:
        raise ValueError(f"few-shot examples must come from train only; got splits {sorted(set(train['split'].to_pylist()))}")
    if forbid_dialogues and set(train["dialogue_id"].to_pylist()) & forbid_dialogues:
        raise ValueError("few-shot table shares dialogues with the split being predicted")
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[list[dict], int]]] = {}
    for rows in dialogues(train).values():
        for i, r in enumerate(rows):
            if r.get("label") in labels and (r["text"] or "").strip():
                by_label.setdefault(r["label"], []).append((rows, i))
    out = []
    order = [lab for lab in labels if lab in by_label]
    for j in range(k):
        rows, i = rng.choice(by_label[order[j % len(order)]])
        ctx = [{"speaker": r["speaker"], "text": r["text"]} for r in rows[max(0, i - n_context):i]]
        out.append({"context": ctx, "speaker": rows[i]["speaker"], "text": rows[i]["text"], "label": rows[i]["label"]})
    rng.shuffle(out)
    return out


def build_queries(vanilla: pa.Table | str | Path, template: PromptTemplate, sizes: Sequence[int | None],
                  stride: int | Sequence[int] = 1, chat_template: str | None = None, bos_token: str = "",
                  eos_token: str = "", examples: list[dict] | None = None,
                  max_dialogues: int | None = None, dialogue_ids: Sequence[str] | None = None) -> pa.Table:
    """Every (dialogue, field, target) query of a vanilla prediction table, with its rendered prompt.

    Returns:
        A table, one row per query: ``query_id``, ``split``, ``dialogue_id``, ``field_size``
        (null: whole), ``field_start``, ``field_end`` (positions, end exclusive), ``target_pos``,
        ``target_turn``, ``dialogue_len``, ``prompt``.
    """
    vanilla, emo, sent = read_vanilla(vanilla)
    meta = template.meta
    labels = emo
    dias = dialogues(vanilla)
    ids = list(dias) if dialogue_ids is None else list(dialogue_ids)
    if max_dialogues is not None:
        ids = ids[:max_dialogues]
    cols: dict[str, list] = {k: [] for k in ("query_id", "split", "dialogue_id", "field_size", "field_start",
                                             "field_end", "target_pos", "target_turn", "dialogue_len", "prompt")}
    for d in ids:
        rows = dias[d]
        for f in receptive_fields(len(rows), sizes, stride):
            for t in range(f.start, f.end):
                ctx = prompt_context(rows, f.start, f.end, t, labels, emo, sent, meta.top_k, examples)
                cols["query_id"].append(f"{d}|{f.start}-{f.end}|{t}")
                cols["split"].append(rows[t].get("split"))
                cols["dialogue_id"].append(d)
                cols["field_size"].append(f.size)
                cols["field_start"].append(f.start)
                cols["field_end"].append(f.end)
                cols["target_pos"].append(t)
                cols["target_turn"].append(rows[t]["turn"])
                cols["dialogue_len"].append(len(rows))
                cols["prompt"].append(template.render(ctx, chat_template, bos_token, eos_token))
    types = {"field_size": pa.int64(), "field_start": pa.int64(), "field_end": pa.int64(), "target_pos": pa.int64(),
             "target_turn": pa.int64(), "dialogue_len": pa.int64(), "split": pa.string()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in cols.items()})


def with_content_free(queries: pa.Table, template: PromptTemplate, labels: Sequence[str],
                      chat_template: str | None = None, bos_token: str = "", eos_token: str = "",
                      examples: list[dict] | None = None) -> pa.Table:
    """Append the content-free query (for contextual calibration) to a query table."""
    prompt = template.render(content_free_context(labels, examples), chat_template, bos_token, eos_token)
    row = {c: [None] for c in queries.column_names}
    row.update({"query_id": [CF_DIALOGUE], "dialogue_id": [CF_DIALOGUE], "prompt": [prompt], "target_pos": [0],
                "field_start": [0], "field_end": [1], "dialogue_len": [1]})
    return pa.concat_tables([queries, pa.table(row, schema=queries.schema)])
