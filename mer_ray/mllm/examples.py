"""Data for the multimodal LLM: utterances + feature store -> FARCER prompts -> tensor batches.

One example per target utterance: the prompt (task, label options, optional
few-shot examples from train), the conversation up to the target with each
utterance's modality slots before its text (``[v_i, a_i, u_i]``; a missing
feature is left out), then the query; for training, the label's tokens (and an
explanation, if the reasoning head is on). Template ``farcer-v1``::

    Task: name the emotion of the last utterance. Options: neutral, joy, ...
    Example: "Oh my God!"
    Emotion: surprise
    Conversation:
    Ross: <v><a> Hi. (emotion: neutral)        <- "(emotion: ...)" only with past labels
    Rachel: <v> Oh no!
    Emotion of the last utterance: joy
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

TEMPLATE_VERSION = "farcer-v1"
Key = tuple[str, int]


class PromptConfig(BaseModel):
    """How prompts are built."""

    model_config = ConfigDict(extra="forbid")
    template: Literal["farcer-v1", "farcer-dialogue-v1"] = Field(
        "farcer-v1", description="farcer-v1: one prompt per target utterance; farcer-dialogue-v1: one pass per dialogue, "
                                 "a marker after each utterance (mer_ray/mllm/dialogue.py).")
    references: bool = Field(False, description="farcer-dialogue-v1: write the vanilla model's distribution after each utterance "
                                                "(Lantern x FARCER); needs data.references for every split.")
    reference_top_k: int = Field(3, ge=1, description="Emotions written per reference (as Lantern's prompts).")
    n_shots: int = Field(0, ge=0, le=16, description="Few-shot examples from train in every prompt (0, 3, 7 in FARCER).")
    shot_seed: int = Field(0, description="Seed that picks the few-shot examples.")
    past_labels: bool = Field(False, description="Write earlier turns' labels into the dialogue (gold in train, predicted at inference).")
    context_turns: int = Field(6, ge=0, description="Earlier turns kept before the target utterance.")
    max_tokens: int = Field(320, gt=16, description="Prompt length cap; earliest context turns are dropped first.")
    reasoning: bool = Field(False, description="Train/generate an explanation after the label (needs an 'explanation' column).")
    reasoning_weight: float = Field(1.0, ge=0.0, description="Loss weight of the explanation relative to one label.")


class DataConfig(BaseModel):
    """Where utterances and features come from."""

    model_config = ConfigDict(extra="forbid")
    meld_dir: str | None = Field(None, description="MELD CSV directory (train/dev/test); default: $MER_MELD_DIR.")
    manifests: dict[str, str] = Field(default_factory=dict, description="Split -> manifest (CSV/JSONL/Parquet), instead of MELD.")
    features: str | None = Field(None, description="Feature-store Parquet directory joined on (dialogue_id, turn).")
    train_split: str = Field("train", description="Split that trains (and supplies few-shot examples and class weights).")
    max_dialogues: dict[str, int] = Field(default_factory=dict, description="Split -> keep this many dialogues (seeded sample).")
    subset: dict[str, int] = Field(default_factory=dict, description="Split -> stratified seeded subset of target utterances.")
    seed: int = Field(0, description="Seed of dialogue sampling and subsets.")
    references: dict[str, str] = Field(
        default_factory=dict, description="Split -> vanilla prediction Parquet (file or directory) written as references "
                                          "(prompt.references). Train's must be cross-fitted: models that never saw those dialogues.")


@dataclass
class Example:
    """One prompt: header items, droppable context turns, the target turn + query; items are str or (modality, vector)."""

    header: list
    turns: list[list]
    target: list
    key: Key
    label: str | None = None
    explanation: str | None = None


@dataclass
class Dialogue:
    """Utterances of one dialogue in turn order; ``feats[i]`` maps modality -> vector (absent when missing)."""

    dialogue_id: str
    rows: list[dict]
    feats: list[dict] = field(default_factory=list)


def load_dialogues(cfg: DataConfig, split: str, modalities: dict[str, str]) -> list[Dialogue]:
    """Dialogues of ``split`` with their features.

    Args:
        modalities: modality name -> feature-store column (e.g. ``{"visual": "face_embedding"}``).
    """
    from mer_ray.data.loaders import load_manifest, load_meld

    if split in cfg.manifests:
        table = load_manifest(cfg.manifests[split])
    else:  # data.meld_dir, else $MER_MELD_DIR
        from mer_ray.data.loaders import meld_dir

        table = load_meld(meld_dir(cfg.meld_dir), split)
    feats = _read_features(cfg.features, modalities) if cfg.features and modalities else {}
    dialogues: dict[str, Dialogue] = {}
    for row in table.to_pylist():
        d = dialogues.setdefault(row["dialogue_id"], Dialogue(row["dialogue_id"], []))
        d.rows.append(row)
        d.feats.append(feats.get((row["dialogue_id"], row["turn"]), {}))
    out = list(dialogues.values())
    n = cfg.max_dialogues.get(split)
    if n is not None and n < len(out):
        out = sorted(random.Random(cfg.seed).sample(out, n), key=lambda d: d.dialogue_id)
    return out


def _read_features(path: str, modalities: dict[str, str]) -> dict[Key, dict]:
    import pyarrow.dataset as ds

    if not Path(path).exists():
        raise FileNotFoundError(f"feature store not found: {path}")
    data = ds.dataset(path, format="parquet")
    missing = [c for c in modalities.values() if c not in data.schema.names]
    if missing:
        raise ValueError(f"feature store {path} lacks columns {missing}; it has {data.schema.names}")
    t = data.to_table(columns=["dialogue_id", "turn", *modalities.values()])
    cols = {m: t.column(c).to_pylist() for m, c in modalities.items()}
    out: dict[Key, dict] = {}
    for i, (d, k) in enumerate(zip(t.column("dialogue_id").to_pylist(), t.column("turn").to_pylist())):
        out[(d, int(k))] = {m: np.asarray(v[i], dtype=np.float32) for m, v in cols.items() if v[i] is not None}
    return out


def stratified_keys(dialogues: list[Dialogue], n: int, seed: int) -> set[Key]:
    """A fixed, stratified (by gold label), seeded subset of ``n`` target utterances."""
    from sklearn.model_selection import train_test_split

    keys = [(d.dialogue_id, r["turn"]) for d in dialogues for r in d.rows]
    labels = [r["label"] for d in dialogues for r in d.rows]
    if n >= len(keys):
        return set(keys)
    picked, _ = train_test_split(keys, train_size=n, stratify=labels, random_state=seed)
    return {(k[0], int(k[1])) for k in picked}


def sample_shots(dialogues: list[Dialogue], n: int, seed: int, labels: tuple[str, ...]) -> list[tuple[str, str]]:
    """``n`` (text, label) few-shot examples from train, cycling through the labels so rare ones appear."""
    if n == 0:
        return []
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = {lab: [] for lab in labels}
    for d in dialogues:
        for r in d.rows:
            if r.get("label") in by_label and 3 <= len(r["text"].split()) <= 25:
                by_label[r["label"]].append(r["text"])
    order = [lab for lab in rng.sample(list(labels), len(labels)) if by_label[lab]]
    if not order:
        raise ValueError("no labelled training utterances to draw few-shot examples from")
    return [(rng.choice(by_label[lab]), lab) for lab in (order * n)[:n]]


def build_example(d: Dialogue, i: int, cfg: PromptConfig, labels: tuple[str, ...], shots: list[tuple[str, str]],
                  past: list[str | None] | None = None) -> Example:
    """The prompt for utterance ``i`` of ``d``; ``past`` gives earlier turns' labels when ``cfg.past_labels``."""
    header: list = [f"Task: name the emotion of the last utterance. Options: {', '.join(labels)}.\n"]
    header += [f'Example: "{t}"\nEmotion: {lab}\n' for t, lab in shots]
    header.append("Conversation:")

    def turn(j: int, with_label: bool) -> list:
        r = d.rows[j]
        items: list = [f"\n{r['speaker']}:"]
        items += [(m, d.feats[j][m]) for m in sorted(d.feats[j], key=_modality_rank)] if d.feats else []
        text = f" {r['text']}"
        if with_label and past is not None and past[j] is not None:
            text += f" (emotion: {past[j]})"
        return items + [text]

    lo = max(0, i - cfg.context_turns)
    turns = [turn(j, cfg.past_labels) for j in range(lo, i)]
    target = turn(i, False) + ["\nEmotion of the last utterance:"]
    r = d.rows[i]
    return Example(header, turns, target, (d.dialogue_id, int(r["turn"])), r.get("label"), r.get("explanation"))


def _modality_rank(m: str) -> tuple[int, str]:
    """Slot order within a turn: visual, then audio, then any other modality by name (FARCER's v_i, a_i, u_i)."""
    return ({"visual": 0, "audio": 1}.get(m, 2), m)


def class_weights(dialogues: list[Dialogue], labels: tuple[str, ...]) -> dict[str, float]:
    """sklearn ``compute_class_weight("balanced")`` over train labels; classes absent from train get 1.0."""
    from sklearn.utils.class_weight import compute_class_weight

    y = [r["label"] for d in dialogues for r in d.rows if r.get("label") in labels]
    present = np.array(sorted(set(y)))
    w = compute_class_weight("balanced", classes=present, y=np.array(y))
    out = {lab: 1.0 for lab in labels}
    out.update({str(c): float(x) for c, x in zip(present, w)})
    return out


class Collator:
    """Examples -> the batch dict :class:`~mer_ray.mllm.model.MultimodalLM` takes (right padding).

    Args:
        tokenizer: the LLM's tokenizer.
        labels: the label set, in order.
        weights: class weights (label -> weight) for training; None = all 1.
        max_tokens: prompt cap (earliest context turns dropped first, then the prompt is cut from the left).
        pad_to: pad/cut every row to exactly this length (benchmarks).
    """

    def __init__(self, tokenizer, labels: tuple[str, ...], weights: dict[str, float] | None = None, max_tokens: int = 320,
                 pad_to: int | None = None, reasoning_weight: float = 1.0):
        self.tok, self.labels, self.max_tokens, self.pad_to = tokenizer, tuple(labels), max_tokens, pad_to
        self.weights = weights or {lab: 1.0 for lab in labels}
        self.reasoning_weight = reasoning_weight
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.label_tokens = [self._ids(" " + lab) for lab in self.labels]
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _items(self, parts: list) -> list:
        out: list = []
        for p in parts:
            if isinstance(p, str):
                if p not in self._cache:
                    if len(self._cache) > 100_000:  # bound memory on huge datasets
                        self._cache.clear()
                    self._cache[p] = self._ids(p)
                out += self._cache[p]
            else:
                out.append(p)
        return out

    def prompt_items(self, ex: Example) -> list:
        """Token ids and (modality, vector) slots of the prompt, within ``max_tokens``."""
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        head, target = bos + self._items(ex.header), self._items(ex.target)
        turns = [self._items(t) for t in ex.turns]
        while turns and len(head) + sum(map(len, turns)) + len(target) > self.max_tokens:
            turns.pop(0)
        items = head + [x for t in turns for x in t] + target
        return items[-self.max_tokens:] if len(items) > self.max_tokens else items

    def __call__(self, examples: list[Example], train: bool = False) -> dict[str, torch.Tensor]:
        rows, tails, feats = [], [], {}
        for ex in examples:
            items = self.prompt_items(ex)
            tail: list[tuple[int, float]] = []
            if train:
                if ex.label not in self.labels:
                    raise ValueError(f"utterance {ex.key}: label {ex.label!r} is not in the label set {list(self.labels)}")
                toks = self.label_tokens[self.labels.index(ex.label)]
                tail = [(t, self.weights[ex.label] / len(toks)) for t in toks]
                if ex.explanation:
                    et = self._ids("\nReason: " + ex.explanation) + [self.tok.eos_token_id]
                    tail += [(t, self.reasoning_weight / len(et)) for t in et]
            rows.append(items)
            tails.append(tail)
        T = self.pad_to or max(len(r) + len(t) for r, t in zip(rows, tails))
        B = len(rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        weights = torch.zeros((B, T), dtype=torch.float32)
        score_pos = torch.zeros(B, dtype=torch.long)
        for b, (items, tail) in enumerate(zip(rows, tails)):
            if len(items) + len(tail) > T:  # only with pad_to: cut the prompt from the left
                items = items[len(items) + len(tail) - T:]
            for t, it in enumerate(items):
                if isinstance(it, tuple):
                    feats.setdefault(it[0], []).append((b, t, it[1]))
                else:
                    ids[b, t] = it
            n = len(items)
            score_pos[b] = n - 1
            for j, (tok, w) in enumerate(tail):
                ids[b, n + j], labels[b, n + j], weights[b, n + j] = tok, tok, w
            mask[b, : n + len(tail)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "score_pos": score_pos}
        if train:
            batch.update(labels=labels, loss_weights=weights)
        for m, slots in feats.items():
            batch[f"pos_{m}"] = torch.tensor([(b, t) for b, t, _ in slots], dtype=torch.long)
            batch[f"feat_{m}"] = torch.from_numpy(np.stack([v for _, _, v in slots])).float()
        return batch


def label_counts(dialogues: list[Dialogue]) -> dict[str, int]:
    """Gold label counts (for logs and reports)."""
    return dict(Counter(r.get("label") for d in dialogues for r in d.rows))


def to_table(rows: list[dict]) -> pa.Table:
    """Rows -> Arrow (small helper for prediction files)."""
    return pa.Table.from_pylist(rows)
