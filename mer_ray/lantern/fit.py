"""Fusion data, training and k-fold cross-fitting (never on test).

:func:`assemble` turns vanilla predictions and LLM query outputs into padded
tensors, one row per utterance; :func:`cross_fit` fits each candidate setting on
k-1 folds of dev dialogues and predicts the held-out fold; :func:`select`
picks the best held-out setting, with vanilla-only among the candidates, so it
never picks a fusion that is worse than vanilla on held-out folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mer_ray.data.fields import receptive_fields
from mer_ray.lantern.model import FusionConfig, build_fusion, candidate_features
from mer_ray.lantern.queries import CF_DIALOGUE, dialogues


@dataclass
class FusionData:
    """Padded fusion inputs for ``N`` utterances with at most ``M`` LLM candidates each."""

    dialogue_id: list[str]
    turn: list[int]
    vanilla: torch.Tensor  # [N, C]
    llm: torch.Tensor  # [N, M, C]
    mask: torch.Tensor  # [N, M] bool
    feats: torch.Tensor  # [N, M, F]
    y: torch.Tensor | None = None  # [N] gold indices (evaluation/fitting only)

    def take(self, idx: np.ndarray) -> FusionData:
        t = torch.as_tensor(idx, dtype=torch.long)
        return FusionData([self.dialogue_id[i] for i in idx], [self.turn[i] for i in idx], self.vanilla[t],
                          self.llm[t], self.mask[t], self.feats[t], None if self.y is None else self.y[t])

    def llm_only(self) -> np.ndarray:
        """Mean LLM distribution over covering fields ``[N, C]``; vanilla where none covers."""
        m = self.mask.float()[..., None]
        mean = (self.llm * m).sum(1) / m.sum(1).clamp_min(1)
        return torch.where(self.mask.any(1, keepdim=True), mean, self.vanilla).numpy()


def calibrate(probs: np.ndarray, content_free: np.ndarray | None) -> np.ndarray:
    """Contextual calibration: divide by the content-free distribution and renormalise."""
    if content_free is None:
        return probs
    q = probs / np.clip(content_free, 1e-12, None)
    return q / q.sum(-1, keepdims=True)


def content_free_probs(llm: pa.Table) -> np.ndarray | None:
    rows = [p for d, p, s in zip(llm["dialogue_id"].to_pylist(), llm["llm_probs"].to_pylist(),
                                 llm["status"].to_pylist()) if d == CF_DIALOGUE and s == "ok"]
    return np.asarray(rows[0], dtype=np.float64) if rows else None


def assemble(vanilla: pa.Table, llm: pa.Table | None, sizes: Sequence[int | None] | None = None,
             stride: int = 1, calibrated: bool = False, gold: dict | None = None,
             labels: Sequence[str] | None = None) -> FusionData:
    """Build fusion inputs.

    Args:
        vanilla: vanilla predictions (``dialogue_id``, ``turn``, ``emotion_probs``).
        llm: :func:`~mer_ray.lantern.job.load_llm_outputs` table (``None``: no LLM candidates).
        sizes: keep only LLM fields that slicing with these sizes gives (ablation); ``None``: all.
        stride: the stride the prompt job used (for the ablation's field sets).
        calibrated: apply contextual calibration to the LLM distributions.
        gold: ``{(dialogue_id, turn): label}`` for fitting/evaluation; never an input.
        labels: label order (for ``gold``).
    """
    dias = dialogues(vanilla.select(["dialogue_id", "turn", "emotion_probs"]))
    cands: dict[tuple[str, int], list[tuple[int, int, int, np.ndarray]]] = {}
    if llm is not None and llm.num_rows:
        cf = content_free_probs(llm) if calibrated else None
        allowed: dict[str, set] = {}
        for row in llm.to_pylist():
            d = row["dialogue_id"]
            if d == CF_DIALOGUE or row["status"] != "ok" or d not in dias:
                continue
            n = len(dias[d])
            if sizes is not None:
                if d not in allowed:
                    allowed[d] = {(f.start, f.end) for f in receptive_fields(n, list(sizes), stride)}
                if (row["field_start"], row["field_end"]) not in allowed[d]:
                    continue
            p = calibrate(np.asarray(row["llm_probs"], dtype=np.float64), cf)
            cands.setdefault((d, row["target_pos"]), []).append((row["field_start"], row["field_end"], n, p))
    keys, van, ys = [], [], []
    for d, rows in dias.items():
        for pos, r in enumerate(rows):
            keys.append((d, r["turn"], pos))
            van.append(np.asarray(r["emotion_probs"], dtype=np.float32))
            if gold is not None:
                ys.append(list(labels).index(gold[(d, r["turn"])]))
    n_cls = len(van[0])
    m = max([len(cands.get((d, pos), [])) for d, _, pos in keys] + [1])
    llm_t = torch.full((len(keys), m, n_cls), 1.0 / n_cls)
    mask = torch.zeros(len(keys), m, dtype=torch.bool)
    span = torch.ones(len(keys), m, dtype=torch.long)
    dlen = torch.ones(len(keys), m, dtype=torch.long)
    rel = torch.zeros(len(keys), m, dtype=torch.long)
    for i, (d, _, pos) in enumerate(keys):
        for j, (s, e, n, p) in enumerate(sorted(cands.get((d, pos), []), key=lambda c: (c[1] - c[0], c[0]))):
            llm_t[i, j] = torch.as_tensor(p, dtype=torch.float32)
            mask[i, j] = True
            span[i, j], dlen[i, j], rel[i, j] = e - s, n, pos - s
    feats = candidate_features(span, dlen, rel, llm_t)
    return FusionData([k[0] for k in keys], [k[1] for k in keys], torch.as_tensor(np.stack(van)), llm_t, mask,
                      feats, torch.as_tensor(ys) if gold is not None else None)


def fit(data: FusionData, hidden: int = 16, weight_decay: float = 1e-3, steps: int = 300, lr: float = 0.05,
        seed: int = 0):
    """Fit a fusion module on ``data`` (full batch, Adam, cross-entropy). Starts at vanilla-only."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch steps: more threads only add contention
    try:
        return _fit(data, hidden, weight_decay, steps, lr)
    finally:
        torch.set_num_threads(threads)


def _fit(data: FusionData, hidden: int, weight_decay: float, steps: int, lr: float):
    model = build_fusion(FusionConfig(n_classes=data.vanilla.shape[1], n_features=data.feats.shape[-1], hidden=hidden))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.nll_loss(model(data.vanilla, data.llm, data.mask, data.feats), data.y)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, data: FusionData) -> np.ndarray:
    """Fused distributions ``[N, C]``."""
    return model(data.vanilla, data.llm, data.mask, data.feats).exp().numpy()


def folds(dialogue_ids: Sequence[str], k: int, seed: int = 0) -> list[np.ndarray]:
    """Utterance indices of ``k`` folds of whole dialogues (a dialogue never straddles folds)."""
    uniq = sorted(set(dialogue_ids))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    fold_of = {d: i % k for i, d in enumerate(uniq)}
    ids = np.array([fold_of[d] for d in dialogue_ids])
    return [np.flatnonzero(ids == f) for f in range(k)]


def cross_fit(data: FusionData, settings: dict[str, dict], k: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Held-out predictions ``[N, C]`` on ``data`` for each setting (plus ``vanilla``)."""
    out = {"vanilla": data.vanilla.numpy().copy()}
    parts = folds(data.dialogue_id, k, seed)
    for name, hp in settings.items():
        pred = np.zeros_like(out["vanilla"])
        for f in range(k):
            train = np.concatenate([parts[g] for g in range(k) if g != f])
            model = fit(data.take(train), seed=seed, **hp)
            pred[parts[f]] = predict(model, data.take(parts[f]))
        out[name] = pred
    return out


def select(heldout: dict[str, np.ndarray], y: np.ndarray, labels: Sequence[str]) -> tuple[str, dict[str, dict]]:
    """Pick the setting with the best held-out weighted F1; vanilla wins ties. Returns (name, metrics)."""
    import warnings

    from mer_ray.eval.metrics import compute_metrics

    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    yt = [labels[i] for i in y]
    metrics = {n: compute_metrics(yt, [labels[i] for i in p.argmax(1)], list(labels)) for n, p in heldout.items()}
    best = "vanilla"
    for n, m in metrics.items():
        if m["weighted_f1"] > metrics[best]["weighted_f1"] + 1e-9:
            best = n
    return best, metrics
