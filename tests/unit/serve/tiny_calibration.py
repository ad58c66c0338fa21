"""A ``calibration.json`` for the tiny test models, built from the tiny vanilla model's own predictions.

No fitting code is used (that is ``mer calibrate``'s, tested on its own): the temperatures are fixed
values, and the conformal scores are ``1 - p[gold]`` of the calibrated, projected probabilities on
generated rows whose gold labels are drawn from those probabilities (so the sets have the coverage they
promise on more rows drawn the same way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mer_ray.calibration.artifacts import Calibration, ConformalScores
from mer_ray.data.labelmap import project
from mer_ray.data.labels import MAPPINGS, get_label_set
from mer_ray.serve.ensemble import label_map

#: Different on purpose: ``probs`` (final_no_llm, sharpened) and ``vanilla`` (softened) must each get their own.
TEMPERATURES = {"final_no_llm": 0.5, "final_llm": 0.8, "vanilla": 2.0, "llm": 1.5}
ALPHA_RANGE = (0.05, 0.5)
#: Label sets that get conformal scores; ``iemocap4`` (also mapped from meld7) deliberately gets none.
SET_LABEL_SETS = ("meld7", "meld_sentiment3")


def tiny_rows(n: int, seed: int = 0) -> list[list[dict]]:
    """Dialogues of 8 turns (two speakers) with random unit text embeddings, as MiniLM's are."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 384))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = [{"speaker": "AB"[i % 2], "text": f"turn {i}", "turn": i % 8, "text_embedding": emb[i].tolist()} for i in range(n)]
    return [rows[k:k + 8] for k in range(0, n, 8)]


def _scores(probs: np.ndarray, gold: list[str | None], labels: list[str]) -> ConformalScores:
    keep = [(i, g) for i, g in enumerate(gold) if g is not None]  # a gold label the map drops has no score
    s = {lab: sorted(1.0 - probs[i, labels.index(lab)] for i, g in keep if g == lab) for lab in labels}
    return ConformalScores(labels=labels, all=sorted(x for v in s.values() for x in v), per_label={k: v for k, v in s.items() if v})


def write_calibration(models_dir: str | Path, n: int = 240, seed: int = 0, method: str = "class_conditional_lac") -> Calibration:
    """Save a calibration for ``models_dir`` (a tiny models dir predicting meld7) and return it."""
    from mer_ray.vanilla.predict import VanillaPredictor

    pred = VanillaPredictor.from_dir(Path(models_dir) / "vanilla")
    raw = np.concatenate([pred.predict_dialogue(d)["emotion_probs"] for d in tiny_rows(n, seed)])
    labels = list(pred.emotion_labels)
    cal = Calibration(label_set="meld7", labels=labels, temperatures=TEMPERATURES, method=method, alpha_default=0.1,
                      alpha_range=ALPHA_RANGE, fitted_on={"split": "generated rows (tests)", "n": n})
    rng = np.random.default_rng(seed + 1)
    conformal: dict[str, dict[str, ConformalScores]] = {}
    for dist in ("final_no_llm", "final_llm"):
        p = cal.calibrate(dist, raw)
        gold = [labels[rng.choice(len(labels), p=row / row.sum())] for row in p]
        for target in SET_LABEL_SETS:
            _, tlabels, proj = label_map("meld7", target)
            mapping = MAPPINGS.get(("meld7", target)) or {lab: lab for lab in get_label_set("meld7").labels}
            pt = p if proj is None else project(p, proj)
            conformal.setdefault(dist, {})[target] = _scores(pt, [mapping[g] for g in gold], tlabels)
    cal = cal.model_copy(update={"conformal": conformal})
    cal.save(models_dir)
    return cal
