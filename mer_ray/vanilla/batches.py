"""From utterance rows to dialogue batches for :class:`~mer_ray.vanilla.model.VanillaModel`.

Gold columns are read only when label sets are passed (training, and dev for
model selection). Prediction builds dialogues without them, from a table whose
gold columns were already dropped, so labels cannot reach the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from mer_ray.vanilla.model import VanillaConfig
from mer_ray.vanilla.tokens import encode, special_ids, utterance_string


@dataclass
class EncodedDialogue:
    """One dialogue's inputs (and, for training, its targets), in turn order."""

    dialogue_id: str
    turns: list[int]
    speakers: list[str]
    texts: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # column -> [T, d] float32
    present: dict[str, np.ndarray] = field(default_factory=dict)  # column -> [T] bool
    token_ids: list[list[int]] | None = None
    emotion: np.ndarray | None = None  # [T] int64, -1 = missing
    sentiment: np.ndarray | None = None  # [T] int64, -1 = missing
    vad: np.ndarray | None = None  # [T, 3] float32, NaN = missing

    def __len__(self) -> int:
        return len(self.turns)


def _labels(col: list, labels: Sequence[str], name: str, ids: list, turns: list) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.full(len(col), -1, dtype=np.int64)
    for i, v in enumerate(col):
        if v is None or v == "":
            continue
        if v not in index:
            raise ValueError(f"unknown {name} {v!r} at dialogue {ids[i]!r} turn {turns[i]}; expected one of {list(labels)}")
        out[i] = index[v]
    return out


def dialogues_from_table(table: pa.Table, cfg: VanillaConfig, emotion_labels: Sequence[str] | None = None,
                         sentiment_labels: Sequence[str] | None = None) -> list[EncodedDialogue]:
    """Group utterance rows into dialogues ordered by (dialogue_id, turn).

    Args:
        table: rows with ``dialogue_id``, ``turn``, ``speaker``, ``text`` and, for frozen inputs,
            the configured feature columns (null where a feature could not be computed).
        cfg: the model config (which columns, token budget).
        emotion_labels: pass to read gold ``label`` (and VAD) as targets; None never reads gold.
        sentiment_labels: pass to read gold ``sentiment`` as a target.
    """
    missing = [c for c in ("dialogue_id", "turn", "speaker", "text", *cfg.modalities) if c not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} (has {table.column_names})")
    table = table.sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])
    ids = table.column("dialogue_id").to_pylist()
    turns = table.column("turn").to_pylist()
    speakers = [s or "" for s in table.column("speaker").to_pylist()]
    texts = [t or "" for t in table.column("text").to_pylist()]
    feats = {}
    for m in cfg.modalities:
        vals = table.column(m).to_pylist()
        width = cfg.dim(m)
        arr = np.full((len(vals), width), np.nan, dtype=np.float32)
        for i, v in enumerate(vals):
            if v is not None:
                if len(v) != width:
                    raise ValueError(f"{m} has {len(v)} values at dialogue {ids[i]!r} turn {turns[i]}; expected {width}")
                arr[i] = v
        feats[m] = arr
    tokens = encode([utterance_string(s, t) for s, t in zip(speakers, texts)], cfg.max_tokens) if cfg.encoder != "frozen" else None
    emo = sent = vad = None
    if emotion_labels is not None:
        emo = _labels(table.column("label").to_pylist(), emotion_labels, "label", ids, turns)
        vad = np.full((len(ids), 3), np.nan, dtype=np.float32)
        for j, c in enumerate(("valence", "arousal", "dominance")):
            if c in table.column_names:
                vad[:, j] = [np.nan if v is None else v for v in table.column(c).to_pylist()]
    if sentiment_labels is not None and "sentiment" in table.column_names:
        sent = _labels(table.column("sentiment").to_pylist(), sentiment_labels, "sentiment", ids, turns)

    out: list[EncodedDialogue] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            sl = slice(start, i)
            d = EncodedDialogue(ids[start], turns[sl], speakers[sl], texts[sl])
            for m, arr in feats.items():
                present = ~np.isnan(arr[sl]).any(axis=1)
                d.features[m] = np.nan_to_num(arr[sl])  # masked out by `present` in the model
                d.present[m] = present
            d.token_ids = tokens[sl] if tokens is not None else None
            d.emotion = emo[sl] if emo is not None else None
            d.sentiment = sent[sl] if sent is not None else None
            d.vad = vad[sl] if vad is not None else None
            out.append(d)
            start = i
    return out


def speaker_slots(speakers: Sequence[str], max_speakers: int) -> list[int]:
    """Dialogue-local speaker ids by order of first appearance, capped at ``max_speakers - 1``."""
    seen: dict[str, int] = {}
    return [min(seen.setdefault(s, len(seen)), max_speakers - 1) for s in speakers]


def collate(dialogues: Sequence[EncodedDialogue], cfg: VanillaConfig, chunk_tokens: int = 1024, with_targets: bool = True) -> dict:
    """Pad a list of dialogues into one batch (see ``VanillaModel.forward`` for the keys)."""
    B, T = len(dialogues), max(len(d) for d in dialogues)
    utt_mask = torch.zeros(B, T, dtype=torch.bool)
    speaker = torch.zeros(B, T, dtype=torch.long)
    batch: dict = {}
    for b, d in enumerate(dialogues):
        utt_mask[b, : len(d)] = True
        speaker[b, : len(d)] = torch.tensor(speaker_slots(d.speakers, cfg.max_speakers))
    batch["utt_mask"], batch["speaker"] = utt_mask, speaker
    for m in cfg.modalities:
        x = torch.zeros(B, T, cfg.dim(m))
        p = torch.zeros(B, T, dtype=torch.bool)
        for b, d in enumerate(dialogues):
            x[b, : len(d)] = torch.from_numpy(d.features[m])
            p[b, : len(d)] = torch.from_numpy(d.present[m])
        batch[m], batch[f"{m}_mask"] = x, p
    if cfg.encoder != "frozen":
        batch["chunks"] = token_chunks(dialogues, cfg, chunk_tokens)
    if with_targets and dialogues[0].emotion is not None:
        emo = torch.full((B, T), -1, dtype=torch.long)
        sent = torch.full((B, T), -1, dtype=torch.long)
        vad = torch.zeros(B, T, 3)
        vmask = torch.zeros(B, T, 3, dtype=torch.bool)
        for b, d in enumerate(dialogues):
            emo[b, : len(d)] = torch.from_numpy(d.emotion)
            if d.sentiment is not None:
                sent[b, : len(d)] = torch.from_numpy(d.sentiment)
            v = torch.from_numpy(d.vad)
            vmask[b, : len(d)] = ~torch.isnan(v)
            vad[b, : len(d)] = torch.nan_to_num(v)
        batch.update(emotion=emo, sentiment=sent, vad=vad, vad_mask=vmask)
    return batch


def token_chunks(dialogues: Sequence[EncodedDialogue], cfg: VanillaConfig, chunk_tokens: int = 1024) -> list[tuple]:
    """Encoder inputs for a batch: sequences (one utterance each, or packed dialogue windows) sorted
    by length and grouped so each chunk holds about ``chunk_tokens`` padded tokens.

    Each chunk is (ids [n, L], attention [n, L], pool [n, U, L], sel [k], pos [k]); an utterance's span
    is its tokens plus the [SEP] after it, and ``pos`` indexes utterances in row-major batch order.
    """
    cls_id, sep_id = special_ids()
    seqs: list[list[tuple[int, list[int]]]] = []  # each: [(flat utterance index, ids), ...]
    k = 0
    for d in dialogues:
        cur: list[tuple[int, list[int]]] = []
        used = 1
        for ids in d.token_ids:
            n = len(ids) + 1
            if cur and (cfg.text_context == "utterance" or used + n > cfg.window_tokens):
                seqs.append(cur)
                cur, used = [], 1
            cur.append((k, ids))
            used += n
            k += 1
        seqs.append(cur)
    seq_len = [1 + sum(len(ids) + 1 for _, ids in q) for q in seqs]
    order = sorted(range(len(seqs)), key=lambda i: seq_len[i])
    groups, cur = [], []
    for i in order:  # ascending lengths: the last member sets the padded width
        if cur and (len(cur) + 1) * seq_len[i] > chunk_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    chunks = []
    for g in groups:
        L = max(seq_len[i] for i in g)
        U = max(len(seqs[i]) for i in g)
        ids_t = torch.zeros(len(g), L, dtype=torch.long)
        att = torch.zeros(len(g), L, dtype=torch.long)
        pool = torch.zeros(len(g), U, L)
        sel, pos = [], []
        for r, i in enumerate(g):
            row, spans = [cls_id], []
            for _, ids in seqs[i]:
                spans.append((len(row), len(row) + len(ids) + 1))
                row += list(ids) + [sep_id]
            ids_t[r, : len(row)] = torch.tensor(row)
            att[r, : len(row)] = 1
            for u, ((utt, _), (a, b)) in enumerate(zip(seqs[i], spans)):
                pool[r, u, a:b] = 1.0 / (b - a)
                sel.append(r * U + u)
                pos.append(utt)
        chunks.append((ids_t, att, pool, torch.tensor(sel), torch.tensor(pos)))
    return chunks


def length_batches(dialogues: Sequence[EncodedDialogue], max_utterances: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Indices of dialogues grouped into batches of at most ``max_utterances`` utterances (a dialogue
    longer than that is a batch alone). With ``rng`` the dialogue order and batch order are shuffled."""
    order = list(range(len(dialogues)))
    if rng is not None:
        rng.shuffle(order)
    batches, cur, n = [], [], 0
    for i in order:
        if cur and n + len(dialogues[i]) > max_utterances:
            batches.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += len(dialogues[i])
    if cur:
        batches.append(cur)
    return batches
