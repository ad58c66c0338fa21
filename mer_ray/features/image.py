"""Optional image stage: a Hugging Face ViT from a local directory; mean CLS vector over the frames
(FARCER's visual token). Any ``AutoModel`` whose output has ``last_hidden_state`` works."""

from __future__ import annotations

import numpy as np

from mer_ray.features.faces import frames_from


class ImageEncoder:
    """ViT CLS embeddings: uint8 [n, h, w, 3] RGB frames -> float32 [n, H]."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.torch, self.device = torch, device
        self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.dim = self.model.config.hidden_size

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        inputs = self.processor(images=list(frames), return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            return self.model(**inputs).last_hidden_state[:, 0].float().cpu().numpy()


class ImageStage:
    """Adds ``image_embedding`` [H] (mean CLS over the row's frames; null without frames)."""

    def __init__(self, model_dir: str, threads: int | None = 1, device: str = "cpu"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.encoder = ImageEncoder(model_dir, device)

    def __call__(self, batch: dict) -> dict:
        out = []
        for raw, shape in zip(batch["_frames"], batch["_frame_shape"]):
            frames = frames_from(raw, shape)
            out.append(self.encoder(frames).mean(0).tolist() if len(frames) else None)
        return {"image_embedding": out}
