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

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embeddings [n, 384] float32 of ``texts`` (None counts as empty).

        ``batch_size``: texts per padded forward pass; sentence-transformers sorts the texts by length first,
        so each pass pads to about its own length (None: all in one pass, what extraction does).
        """
        texts = ["" if t is None else str(t) for t in texts]
        bs = batch_size or len(texts) or 1
        return np.asarray(self.model.encode(texts, batch_size=bs, convert_to_numpy=True, show_progress_bar=False),
                          dtype=np.float32)

    def __call__(self, batch: dict) -> dict:
        emb = self.encode(list(batch["text"]))
        return {"text_embedding": [e.tolist() for e in emb]}
