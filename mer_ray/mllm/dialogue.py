"""One forward pass per dialogue (template ``farcer-dialogue-v1``): a marker after every utterance.

Per-utterance prompts (``farcer-v1``) cost one forward pass per target
utterance, so an epoch of MELD train is about 10k passes over overlapping
context. Here a dialogue is one sequence: each utterance is followed by the
marker ``\\nEmotion:``, and the LLM's next-token distribution at the marker's
last token, renormalised over the label set, is that utterance's
distribution. No label token is ever written into the sequence, so nothing
leaks forward: causal attention lets utterance ``i`` see turns ``<= i`` and
their references, never a label. Template::

    Task: name the emotion of each utterance. Options: neutral, joy, ...
    Conversation:
    Ross: <v><a> Hi. (reference: neutral 0.62, joy 0.20, surprise 0.09)   <- with prompt.references
    Emotion:
    Rachel: <v> Oh no!
    Emotion:

References are the vanilla model's distribution of each utterance, written
the way Lantern's ``lantern_v2`` template writes them (top 3, two decimals).
A dialogue longer than ``max_tokens`` is cut into segments; each segment
repeats up to ``context_turns`` earlier turns as unscored context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mer_ray.mllm.examples import Dialogue, Key, PromptConfig, _modality_rank

DIALOGUE_TEMPLATE = "farcer-dialogue-v1"
MARKER = "\nEmotion:"


@dataclass
class Segment:
    """Items of one sequence and the utterances it scores.

    Attributes:
        items: token ids and ``(modality, vector)`` slots.
        markers: index in ``items`` of each scored utterance's marker end.
        keys: ``(dialogue_id, turn)`` of each scored utterance.
        labels: gold label of each scored utterance (training only; None at inference).
    """

    items: list
    markers: list[int]
    keys: list[Key]
    labels: list[str | None]


def reference_text(probs: np.ndarray, labels: tuple[str, ...], top_k: int = 3) -> str:
    """`` (reference: neutral 0.62, joy 0.20, surprise 0.09)``: Lantern's way of writing a vanilla distribution."""
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, kind="stable")[:top_k]
    return " (reference: " + ", ".join(f"{labels[i]} {p[i]:.2f}" for i in order) + ")"


def read_references(path: str | Path, labels: tuple[str, ...]) -> dict[Key, np.ndarray]:
    """Vanilla distributions ``{(dialogue_id, turn): [C]}`` from a prediction Parquet file or directory.

    Columns are reordered to ``labels`` by name.

    Raises:
        GoldLeakError: the file has gold columns (a prediction file never does).
        ValueError: its label set lacks one of ``labels``.
    """
    import pyarrow.dataset as ds

    from mer_ray.data.leak import assert_no_gold

    table = ds.dataset(str(path), format="parquet").to_table()
    assert_no_gold(table, f"FARCER references ({path})")
    meta = table.schema.metadata or {}
    if b"emotion_labels" not in meta:
        raise ValueError(f"references {path}: schema metadata lacks 'emotion_labels'; not a prediction file")
    have = json.loads(meta[b"emotion_labels"])
    missing = [lab for lab in labels if lab not in have]
    if missing:
        raise ValueError(f"references {path}: labels {have} lack {missing}")
    idx = [have.index(lab) for lab in labels]
    probs = np.asarray(table.column("emotion_probs").to_pylist(), dtype=np.float64)[:, idx]
    probs /= probs.sum(1, keepdims=True)
    return {(d, int(t)): p for d, t, p in zip(table.column("dialogue_id").to_pylist(), table.column("turn").to_pylist(), probs)}


class DialogueEncoder:
    """Dialogues -> :class:`Segment` s (tokenised) -> batches for :class:`~mer_ray.mllm.model.MultimodalLM`.

    Args:
        tokenizer: the LLM's tokenizer.
        labels: the label set; every label must be one token with a leading space (checked).
        prompt: ``max_tokens`` (segment length), ``context_turns`` (unscored context per segment), ``references``.
        weights: class weights for training (label -> weight); None = all 1.
    """

    def __init__(self, tokenizer, labels: tuple[str, ...], prompt: PromptConfig, weights: dict[str, float] | None = None):
        self.tok, self.labels, self.prompt = tokenizer, tuple(labels), prompt
        self.weights = weights or {lab: 1.0 for lab in labels}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = [self._ids(" " + lab) for lab in self.labels]
        multi = [lab for lab, t in zip(self.labels, ids) if len(t) != 1]
        if multi:
            # One marker reads one next-token distribution; a multi-token label would need label tokens in the sequence.
            raise ValueError(f"template {DIALOGUE_TEMPLATE} needs single-token labels; {multi} are several tokens for this tokenizer "
                             f"(use template farcer-v1)")
        self.label_ids = [t[0] for t in ids]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.head = bos + self._ids(f"Task: name the emotion of each utterance. Options: {', '.join(self.labels)}.\nConversation:")
        self.marker = self._ids(MARKER)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _turn(self, d: Dialogue, j: int, refs: dict[Key, np.ndarray] | None) -> list:
        r = d.rows[j]
        items: list = self._ids(f"\n{r['speaker']}:")
        feats = d.feats[j] if d.feats else {}
        items += [(m, feats[m]) for m in sorted(feats, key=_modality_rank)]
        text = f" {r['text']}"
        if refs is not None:
            key = (d.dialogue_id, int(r["turn"]))
            if key not in refs:
                raise KeyError(f"no reference distribution for utterance {key}")
            text += reference_text(refs[key], self.labels, self.prompt.reference_top_k)
        return items + self._ids(text)

    def segments(self, d: Dialogue, refs: dict[Key, np.ndarray] | None = None, train: bool = False) -> list[Segment]:
        """The segments covering every utterance of ``d`` once (as a scored turn)."""
        if self.prompt.references and refs is None:
            raise ValueError("prompt.references is on: give the vanilla reference distributions")
        budget = self.prompt.max_tokens - len(self.head)
        turns = []
        for j in range(len(d.rows)):
            t = self._turn(d, j, refs if self.prompt.references else None)
            turns.append(t[: max(1, budget - len(self.marker))] + self.marker)  # an over-long turn keeps its start
        out, s, n = [], 0, len(turns)
        while s < n:
            c = s
            while c > 0 and s - c < self.prompt.context_turns and sum(map(len, turns[c - 1 : s + 1])) <= budget:
                c -= 1
            used, e = sum(map(len, turns[c:s])), s
            while e < n and (e == s or used + len(turns[e]) <= budget):
                used += len(turns[e])
                e += 1
            items, markers = list(self.head), []
            for j in range(c, e):
                items += turns[j]
                if j >= s:
                    markers.append(len(items) - 1)
            keys = [(d.dialogue_id, int(d.rows[j]["turn"])) for j in range(s, e)]
            labels = [d.rows[j].get("label") if train else None for j in range(s, e)]
            out.append(Segment(items, markers, keys, labels))
            s = e
        return out

    def __call__(self, segs: list[Segment], train: bool = False) -> dict[str, torch.Tensor]:
        """A batch (right padding): ``input_ids``/``attention_mask`` ``[B, T]``, ``marker_pos`` ``[N, 2]``,
        ``label_ids`` ``[K]``, modality slots; for training ``marker_label`` ``[N]`` and ``marker_weight`` ``[N]``."""
        T, B = max(len(s.items) for s in segs), len(segs)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        pos, y, w, feats = [], [], [], {}
        for b, seg in enumerate(segs):
            for t, it in enumerate(seg.items):
                if isinstance(it, tuple):
                    feats.setdefault(it[0], []).append((b, t, it[1]))
                else:
                    ids[b, t] = it
            mask[b, : len(seg.items)] = 1
            pos += [(b, m) for m in seg.markers]
            if train:
                for key, lab in zip(seg.keys, seg.labels):
                    if lab not in self.labels:
                        raise ValueError(f"utterance {key}: label {lab!r} is not in the label set {list(self.labels)}")
                    y.append(self.labels.index(lab))
                    w.append(self.weights[lab])
        batch = {"input_ids": ids, "attention_mask": mask, "marker_pos": torch.tensor(pos, dtype=torch.long),
                 "label_ids": torch.tensor(self.label_ids, dtype=torch.long)}
        if train:
            batch.update(marker_label=torch.tensor(y, dtype=torch.long), marker_weight=torch.tensor(w, dtype=torch.float32))
        for m, slots in feats.items():
            batch[f"pos_{m}"] = torch.tensor([(b, t) for b, t, _ in slots], dtype=torch.long)
            batch[f"feat_{m}"] = torch.from_numpy(np.stack([v for _, _, v in slots])).float()
        return batch


__all__ = ["DIALOGUE_TEMPLATE", "MARKER", "Segment", "DialogueEncoder", "reference_text", "read_references"]
