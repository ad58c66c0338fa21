"""Audio stage: openSMILE eGeMAPSv02 functionals (88-d) by default, or a local HuBERT/wav2vec2."""

from __future__ import annotations

import numpy as np

MIN_SECONDS = 0.1  # shorter audio gives no meaningful functionals


class EgemapsEncoder:
    """openSMILE eGeMAPSv02 functionals: float32 [samples] at ``rate`` -> [88]."""

    dim = 88

    def __init__(self):
        import opensmile

        self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                     feature_level=opensmile.FeatureLevel.Functionals)

    def __call__(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        return self.smile.process_signal(pcm, rate).to_numpy(dtype=np.float32).reshape(-1)


class HFAudioEncoder:
    """A Hugging Face HuBERT/wav2vec2 loaded from a local directory: mean last hidden state [H].

    Args:
        model_dir: a directory with the model's config, weights and feature-extractor config.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch
        from transformers import AutoFeatureExtractor, AutoModel

        self.torch, self.device = torch, device
        self.extractor = AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.dim = self.model.config.hidden_size

    def __call__(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        inputs = self.extractor(pcm, sampling_rate=rate, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state  # [1, T, H]
        return hidden.mean(1)[0].float().cpu().numpy()


class AudioStage:
    """Adds ``audio_egemaps`` [88] (or ``audio_embedding`` [H] for ``encoder="hf"``) from ``_audio``;
    null where there is no audio (the decode stage gave the reason) or it is too short."""

    def __init__(self, encoder: str = "egemaps", model_dir: str | None = None, sample_rate: int = 16000,
                 threads: int | None = 1, device: str = "cpu"):
        self.rate = sample_rate
        if encoder == "egemaps":
            self.encoder, self.column = EgemapsEncoder(), "audio_egemaps"
        elif encoder == "hf":
            import torch

            if threads:
                torch.set_num_threads(threads)
            self.encoder, self.column = HFAudioEncoder(model_dir, device), "audio_embedding"
        else:
            raise ValueError(f"unknown audio encoder {encoder!r}; expected 'egemaps' or 'hf'")

    def __call__(self, batch: dict) -> dict:
        feats, problems = [], []
        for raw, probs in zip(batch["_audio"], batch["_problems"]):
            probs = list(probs or [])
            pcm = np.frombuffer(raw, np.float32) if raw else np.zeros(0, np.float32)
            vec = None
            if len(pcm) >= MIN_SECONDS * self.rate:
                try:
                    v = self.encoder(pcm.copy(), self.rate)
                except Exception as err:  # noqa: BLE001 - one bad row never stops the run
                    v = np.array([np.nan])
                    probs.append(f"audio features failed: {type(err).__name__}: {err}")
                if not np.isfinite(v).all():
                    if not probs or not probs[-1].startswith("audio features failed"):
                        probs.append("audio features not finite: the encoder returned NaN/inf")
                else:
                    vec = v.tolist()
            elif len(pcm):
                probs.append(f"audio too short: {len(pcm) / self.rate:.3f} s decoded")
            feats.append(vec)
            problems.append(probs)
        return {self.column: feats, "_problems": problems}
