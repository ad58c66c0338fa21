"""Pure training and inference steps for the vanilla model (no Ray here).

The Ray Train loop in ``mer_ray.vanilla.train`` and the predictor in
``mer_ray.vanilla.predict`` both call these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mer_ray.vanilla.batches import EncodedDialogue, collate, length_batches
from mer_ray.vanilla.model import VanillaConfig, VanillaModel, multitask_loss


def build_optimizer(model: VanillaModel, lr: float, lr_encoder: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with a smaller learning rate for the pretrained text encoder than for the rest."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    enc = [p for n, p in params if n.startswith("text_encoder.")]
    rest = [p for n, p in params if not n.startswith("text_encoder.")]
    groups = [{"params": rest, "lr": lr}]
    if enc:
        groups.append({"params": enc, "lr": lr_encoder})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_frac`` of the steps, then linear decay to zero."""
    warm = max(1, int(total_steps * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def train_step(model: VanillaModel, batch: dict, optimizer: torch.optim.Optimizer, scheduler, *, sentiment_weight: float,
               vad_weight: float, label_smoothing: float, grad_clip: float, class_weight: torch.Tensor | None = None) -> dict[str, float]:
    """One optimiser step on one batch; returns the loss terms as floats."""
    model.train()
    losses = multitask_loss(model(batch), batch, sentiment_weight, vad_weight, label_smoothing, class_weight)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def predict_dialogues(model: VanillaModel, dialogues: Sequence[EncodedDialogue], cfg: VanillaConfig, max_utterances: int = 256) -> list[dict]:
    """Per-dialogue arrays: ``emotion_probs`` [T, C], ``sentiment_probs`` [T, S] and ``vad`` [T, 3]
    where the heads exist. Targets in the dialogues are ignored."""
    model.eval()
    out: list[dict | None] = [None] * len(dialogues)
    for idx in length_batches(dialogues, max_utterances):
        batch = collate([dialogues[i] for i in idx], cfg, with_targets=False)
        res = model(batch)
        for b, i in enumerate(idx):
            n = len(dialogues[i])
            d = {"emotion_probs": torch.softmax(res["emotion"][b, :n], -1).numpy().astype(np.float32)}
            if "sentiment" in res:
                d["sentiment_probs"] = torch.softmax(res["sentiment"][b, :n], -1).numpy().astype(np.float32)
            if "vad" in res:
                d["vad"] = res["vad"][b, :n].numpy().astype(np.float32)
            out[i] = d
    return out  # type: ignore[return-value]
