"""Text stage: one MiniLM sentence embedding (384-d) per utterance."""

from __future__ import annotations

import numpy as np


class TextStage:
    """Adds ``text_embedding`` [384] to a batch; runs whatever the media's status.

    Args:
        model_dir: a local sentence-transformers directory; None uses the packaged MiniLM.
        threads: ``torch.set_num_threads`` for this worker (None: torch's default).
        device: ``cpu`` or ``cuda`` (the pipeline passes ``cuda`` when the stage is given GPUs).
    """

    def __init__(self, model_dir: str | None = None, threads: int | None = 1, device: str = "cpu"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if model_dir:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(model_dir, device="cpu")
        else:
            from mer_ray.assets import minilm

            self.model = minilm()
        self.model.to(device)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings [n, 384] float32 of ``texts`` (None counts as empty)."""
        texts = ["" if t is None else str(t) for t in texts]
        return np.asarray(self.model.encode(texts, batch_size=len(texts) or 1, convert_to_numpy=True), dtype=np.float32)

    def __call__(self, batch: dict) -> dict:
        emb = self.encode(list(batch["text"]))
        return {"text_embedding": [e.tolist() for e in emb]}
