"""Predictors callable without Ray (Serve deployments and batch jobs wrap them).

``VanillaPredictor`` loads a model directory written by ``mer train`` (or any
epoch checkpoint) and returns full distributions per head. Its inputs are the
utterances' ``speaker``, ``text`` and feature columns: gold columns are dropped
before anything is built, so a label cannot leak into a prediction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mer_ray.data.schema import GOLD_COLUMNS
from mer_ray.vanilla.model import VanillaConfig, build_vanilla


def drop_gold(table: pa.Table) -> pa.Table:
    """``table`` without gold columns (``mer_ray.data.leak.strip_gold`` when available)."""
    try:
        from mer_ray.data.leak import strip_gold
    except ImportError:  # the data helper's module; same behaviour
        return table.drop_columns([c for c in GOLD_COLUMNS if c in table.column_names])
    return strip_gold(table)


#: Columns of the predictions file (besides the head outputs).
KEY_COLUMNS = ("dialogue_id", "turn", "speaker", "text", "split")


class VanillaPredictor:
    """A trained vanilla model plus its label sets."""

    def __init__(self, model, meta: dict, num_threads: int | None = None):
        self.model = model.eval()
        self.meta = meta
        self.cfg: VanillaConfig = model.cfg
        self.emotion_labels: list[str] = list(meta["emotion_labels"])
        self.sentiment_labels: list[str] | None = meta.get("sentiment_labels")
        self.has_vad: bool = bool(meta.get("has_vad"))
        if num_threads:
            torch.set_num_threads(num_threads)

    @classmethod
    def from_dir(cls, model_dir: str | Path, num_threads: int | None = None) -> VanillaPredictor:
        """Load ``model.pt`` + ``vanilla.json`` from a model directory or checkpoint."""
        from mer_ray.vanilla import artifacts

        meta = artifacts.read_meta(model_dir)
        model = build_vanilla(VanillaConfig.model_validate(meta["model"]), pretrained=False)
        missing, unexpected = model.load_state_dict(artifacts.read_weights(model_dir), strict=False)
        if unexpected or [k for k in missing if not k.startswith("scalers.")]:
            raise ValueError(f"{model_dir}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
        if missing and meta.get("feature_scaling"):  # written before the buffers: statistics from the JSON
            model.set_scaling(meta["feature_scaling"])  # (none at all: the scalers stay the identity they are built as)
        return cls(model, meta, num_threads)

    @property
    def label_set(self):
        """The emotion label set (``mer_ray.data.labels.LabelSet``) this model predicts."""
        from mer_ray.data.labels import LabelSet

        return LabelSet("vanilla", tuple(self.emotion_labels))

    def _dialogues(self, table: pa.Table):
        from mer_ray.vanilla.batches import dialogues_from_table

        return dialogues_from_table(drop_gold(table), self.cfg)  # no label sets: gold is never read

    def predict_dialogue(self, utterances: Sequence[dict]) -> dict:
        """Distributions for one dialogue's utterances, in the order given.

        Args:
            utterances: dicts with ``speaker``, ``text`` (and the feature columns a frozen model
                uses, None where missing); ``turn`` optional (defaults to the position).

        Returns:
            ``emotion_probs`` [n, C], ``emotion_pred`` [n] (str), ``sentiment_probs`` [n, S] or None,
            ``vad`` [n, 3] or None, as numpy arrays.
        """
        if not utterances:
            raise ValueError("predict_dialogue needs at least one utterance")
        for i, u in enumerate(utterances):
            if "text" not in u or "speaker" not in u:
                raise ValueError(f"utterance {i} lacks 'text' or 'speaker': {sorted(u)}")
        cols: dict[str, list] = {"dialogue_id": ["d"] * len(utterances),
                                 "turn": [int(u.get("turn", i)) for i, u in enumerate(utterances)],
                                 "speaker": [u["speaker"] or "" for u in utterances], "text": [u["text"] or "" for u in utterances]}
        if len(set(cols["turn"])) != len(utterances):
            raise ValueError(f"duplicate turns in {cols['turn']}")
        for m in self.cfg.modalities:
            cols[m] = [None if u.get(m) is None else [float(x) for x in u[m]] for u in utterances]
        order = np.argsort(cols["turn"], kind="stable")
        out = self.predict_table(pa.table(cols))
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))  # predict_table returns rows sorted by turn
        res = {k: (None if v is None else v[inv]) for k, v in out.items()}
        return res

    def predict_table(self, table: pa.Table, max_utterances: int = 256) -> dict:
        """Arrays over all rows of ``table`` sorted by (dialogue_id, turn)."""
        from mer_ray.vanilla.steps import predict_dialogues

        dialogues = self._dialogues(table)
        per = predict_dialogues(self.model, dialogues, self.cfg, max_utterances)
        probs = np.concatenate([p["emotion_probs"] for p in per])
        return {
            "emotion_probs": probs,
            "emotion_pred": np.array(self.emotion_labels, dtype=object)[probs.argmax(-1)],
            "sentiment_probs": np.concatenate([p["sentiment_probs"] for p in per]) if self.sentiment_labels and "sentiment_probs" in per[0] else None,
            "vad": self._unscale(np.concatenate([p["vad"] for p in per])) if self.has_vad and "vad" in per[0] else None,
        }

    def _unscale(self, vad: np.ndarray) -> np.ndarray:
        """VAD back on the training labels' scale (the head predicts standardised values)."""
        mean = np.asarray(self.meta.get("vad_mean", [0.0] * 3), dtype=np.float32)
        std = np.asarray(self.meta.get("vad_std", [1.0] * 3), dtype=np.float32)
        return (vad * std + mean).astype(np.float32)

    def predictions_table(self, table: pa.Table) -> pa.Table:
        """The predictions file's rows for ``table`` (see docs/vanilla.md); never any gold column."""
        table = drop_gold(table).sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])
        out = self.predict_table(table)
        n = table.num_rows
        cols = {c: (table.column(c) if c in table.column_names else pa.nulls(n, pa.string())) for c in KEY_COLUMNS}
        f32 = pa.list_(pa.float32())
        cols["emotion_probs"] = pa.array(list(out["emotion_probs"]), type=f32)
        cols["emotion_pred"] = pa.array(list(out["emotion_pred"]), type=pa.string())
        cols["sentiment_probs"] = pa.array(list(out["sentiment_probs"]), type=f32) if out["sentiment_probs"] is not None else pa.nulls(n, f32)
        cols["vad"] = pa.array(list(out["vad"]), type=f32) if out["vad"] is not None else pa.nulls(n, f32)
        meta = {"emotion_labels": json.dumps(self.emotion_labels), "sentiment_labels": json.dumps(self.sentiment_labels),
                "model": "vanilla", "seed": json.dumps(self.meta.get("seed"))}
        return pa.table(cols).replace_schema_metadata(meta)
