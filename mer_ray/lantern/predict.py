"""Lantern predictors callable without Ray (Serve deployments wrap these).

- :class:`LanternRefiner`: one dialogue plus its vanilla distributions in, the
  LLM distribution of every receptive field covering each utterance out.
- :class:`FusionPredictor`: fuses a dialogue's vanilla and LLM distributions
  with the fitted fusion module from ``<models>/fusion/`` (or falls back to
  vanilla when selection chose it, or an utterance has no LLM distribution).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mer_ray.lantern.fit import calibrate
from mer_ray.lantern.model import FusionConfig, build_fusion, candidate_features
from mer_ray.lantern.queries import CF_DIALOGUE
from mer_ray.llm.prompts import DEFAULT_TEMPLATE


def _dialogue_table(utterances: list[dict], vanilla: dict, labels: Sequence[str]) -> pa.Table:
    n = len(utterances)
    emo = np.asarray(vanilla["emotion_probs"], dtype=np.float32)
    if emo.shape != (n, len(labels)):
        raise ValueError(f"vanilla emotion_probs has shape {emo.shape}, expected ({n}, {len(labels)})")
    sp = vanilla.get("sentiment_probs")
    cols = {
        "dialogue_id": ["dialogue"] * n, "turn": list(range(n)),
        "speaker": [u.get("speaker") or "Unknown" for u in utterances], "text": [u.get("text") or "" for u in utterances],
        "emotion_probs": pa.array(list(emo), pa.list_(pa.float32())),
        "sentiment_probs": pa.array(list(np.asarray(sp, np.float32)) if sp is not None else [None] * n, pa.list_(pa.float32())),
        "vad": pa.array(list(np.asarray(vanilla["vad"], np.float32)) if vanilla.get("vad") is not None else [None] * n,
                        pa.list_(pa.float32())),
    }
    meta = {"emotion_labels": json.dumps(list(labels))}
    if vanilla.get("sentiment_labels"):
        meta["sentiment_labels"] = json.dumps(list(vanilla["sentiment_labels"]))
    return pa.table(cols).replace_schema_metadata(meta)


class LanternRefiner:
    """LLM distributions per receptive field for one dialogue.

    Args:
        scorer: a :class:`~mer_ray.llm.base.LabelScorer`.
        labels: the label set, in the vanilla model's order.
        sizes: receptive-field sizes (``None``: whole dialogue); stride: window stride.
        template: prompt template name or path; chat: use the model's chat template if any.
    """

    def __init__(self, scorer, labels: Sequence[str], sizes: Sequence[int | None] = (4, None), stride: int = 1,
                 template: str = DEFAULT_TEMPLATE, chat: bool = True, examples: list[dict] | None = None):
        from mer_ray.llm.prompts import PromptTemplate

        self.scorer, self.labels, self.sizes, self.stride = scorer, list(labels), list(sizes), stride
        self.template = PromptTemplate.load(template)
        self.chat = chat and scorer.chat_template is not None
        self.examples = examples

    @classmethod
    def from_config(cls, backend: dict, **kw) -> LanternRefiner:
        from mer_ray.llm.backends import build_scorer

        return cls(build_scorer(backend), **kw)

    def refine(self, utterances: list[dict], vanilla: dict) -> list[list[dict]]:
        """Per utterance, ``[{"start", "end", "size", "probs" [C], "error"}]`` for every covering field.

        Args:
            utterances: ``[{"speaker", "text"}, ...]`` in turn order.
            vanilla: ``emotion_probs [n, C]`` (and optional ``sentiment_probs``, ``sentiment_labels``, ``vad``).
        """
        from mer_ray.lantern.queries import build_queries

        table = _dialogue_table(utterances, vanilla, self.labels)
        q = build_queries(table, self.template, self.sizes, self.stride,
                          self.scorer.chat_template if self.chat else None,
                          getattr(self.scorer, "bos_token", ""), getattr(self.scorer, "eos_token", ""), self.examples)
        prompts = q["prompt"].to_pylist()
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        scores = dict(zip(order, self.scorer.score([prompts[i] for i in order], self.template.labels(self.labels, self.chat))))
        out: list[list[dict]] = [[] for _ in utterances]
        for i, (s, e, size, t) in enumerate(zip(q["field_start"].to_pylist(), q["field_end"].to_pylist(),
                                                q["field_size"].to_pylist(), q["target_pos"].to_pylist())):
            r = scores[i]
            out[t].append({"start": s, "end": e, "size": size, "error": r.error,
                           "probs": None if r.probs is None else r.probs.astype(np.float32)})
        return out

    def content_free(self) -> np.ndarray:
        """The label distribution for a content-free prompt (for calibration)."""
        from mer_ray.lantern.queries import content_free_context

        p = self.template.render(content_free_context(self.labels, self.examples),
                                 self.scorer.chat_template if self.chat else None,
                                 getattr(self.scorer, "bos_token", ""), getattr(self.scorer, "eos_token", ""))
        return self.scorer.score([p], self.template.labels(self.labels, self.chat))[0].probs


class FusionPredictor:
    """The fitted fusion from a ``fusion/`` directory (``fusion.json`` + ``fusion.pt``)."""

    def __init__(self, meta: dict[str, Any], model=None):
        self.meta, self.model = meta, model
        self.labels = list(meta["labels"])
        cf = meta.get("content_free")
        self.content_free = np.asarray(cf) if (cf is not None and meta.get("calibrated")) else None

    @classmethod
    def from_dir(cls, path: str | Path) -> FusionPredictor:
        from mer_ray.lantern import artifacts

        meta = artifacts.read_meta(path)
        if not meta:
            raise FileNotFoundError(f"{path} is not a fusion directory (no {artifacts.META_FILE})")
        model = None
        if meta["mode"] == "fusion":
            hp = meta["setting"]
            model = build_fusion(FusionConfig(n_classes=len(meta["labels"]), hidden=hp.get("hidden", 16)))
            model.load_state_dict(artifacts.read_weights(path))
            model.eval()
        return cls(meta, model)

    @torch.no_grad()
    def fuse(self, vanilla_probs: np.ndarray, refined: list[list[dict]]) -> np.ndarray:
        """Fused distributions ``[n, C]`` from vanilla ``[n, C]`` and :meth:`LanternRefiner.refine`'s output."""
        van = np.asarray(vanilla_probs, dtype=np.float32)
        if self.model is None:
            return van.copy()  # selection chose vanilla-only: the fallback
        n, c = van.shape
        m = max([sum(x["probs"] is not None for x in r) for r in refined] + [1])
        llm = torch.full((n, m, c), 1.0 / c)
        mask = torch.zeros(n, m, dtype=torch.bool)
        span, rel = torch.ones(n, m, dtype=torch.long), torch.zeros(n, m, dtype=torch.long)
        for i, cands in enumerate(refined):
            ok = sorted((x for x in cands if x["probs"] is not None), key=lambda x: (x["end"] - x["start"], x["start"]))
            for j, x in enumerate(ok):
                llm[i, j] = torch.as_tensor(calibrate(np.asarray(x["probs"], np.float64), self.content_free), dtype=torch.float32)
                mask[i, j], span[i, j], rel[i, j] = True, x["end"] - x["start"], i - x["start"]
        feats = candidate_features(span, torch.full_like(span, n), rel, llm)
        return self.model(torch.as_tensor(van), llm, mask, feats).exp().numpy()


__all__ = ["LanternRefiner", "FusionPredictor", "CF_DIALOGUE"]
