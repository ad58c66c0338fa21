"""Projectors: map a per-utterance modality feature into an LLM's input-embedding space.

FARCER projects one visual CLS vector per utterance with either one linear
layer or three linear layers with GELU and dropout. Emotion-LLaMA does the same
per encoder (audio, visual). Plain PyTorch, no Ray or DeepSpeed.

Embedding scale: some LLMs scale token embeddings inside the embedding module
(Gemma multiplies by ``sqrt(hidden_size)``), and ``inputs_embeds`` bypasses
that module. A projected vector must land on the same scale as the text
embeddings it sits between, so the projector multiplies its output by the
model's ``embed_scale`` (1.0 for models without one): its layers learn in
unit scale whatever the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mer_ray.features.scaling import FeatureScaler


@dataclass
class ProjectorConfig:
    """One modality's projector."""

    feature: str
    """Feature-store column that feeds it (``face_embedding``, ``audio_egemaps``, ``vit_cls``, ``hubert``...)."""
    in_dim: int
    """Width of that feature (128 for the expression embedding, 88 for eGeMAPS, 768/1024 for ViT/HuBERT)."""
    kind: Literal["linear", "mlp"] = "linear"
    """``linear``: one layer; ``mlp``: three layers with GELU and dropout (FARCER)."""
    hidden: int = 1024
    """Hidden width of the ``mlp`` kind."""
    dropout: float = 0.1
    """Dropout after each hidden GELU of the ``mlp`` kind."""

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"projector kind must be 'linear' or 'mlp', got {self.kind!r} (feature {self.feature!r})")
        if self.in_dim <= 0 or self.hidden <= 0:
            raise ValueError(f"projector for {self.feature!r}: in_dim and hidden must be positive, got {self.in_dim}, {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"projector for {self.feature!r}: dropout must be in [0, 1), got {self.dropout}")


class Projector(nn.Module):
    """Feature -> one LLM input embedding.

    Args:
        in_dim: feature width D.
        out_dim: LLM hidden size H.
        kind: ``linear`` or ``mlp``.
        hidden: hidden width of the ``mlp`` kind.
        dropout: dropout of the ``mlp`` kind.
        embed_scale: factor the LLM applies to its token embeddings.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int = 1024, dropout: float = 0.1, embed_scale: float = 1.0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden, out_dim),
            )
        else:
            raise ValueError(f"projector kind must be 'linear' or 'mlp', got {kind!r}")
        # Raw features span orders of magnitude (eGeMAPS): robust z-scores fitted on train come first.
        self.norm = FeatureScaler(in_dim)
        # A buffer, so it travels with the state dict and the artifact says what scale it was trained for.
        self.register_buffer("embed_scale", torch.tensor(float(embed_scale)), persistent=True)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features.

        Args:
            x: ``[N, D]`` features (any float dtype; cast to the projector's).

        Returns:
            ``[N, H]`` embeddings on the LLM's input-embedding scale (of the scaled features; the
            scaler is the identity until statistics are set).
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects features of width {self.in_dim}, got shape {tuple(x.shape)}")
        w = next(self.parameters())
        return self.net(self.norm(x).to(w.dtype)) * self.embed_scale.to(w.dtype)


def embed_scale_of(lm: nn.Module) -> float:
    """The factor ``lm``'s input-embedding module multiplies token embeddings by (1.0 if none)."""
    emb = lm.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        return 1.0
    return float(scale.item() if torch.is_tensor(scale) else scale)


def build_projectors(configs: dict[str, ProjectorConfig], hidden_size: int, embed_scale: float = 1.0) -> nn.ModuleDict:
    """One :class:`Projector` per modality name (``visual``, ``audio``...)."""
    return nn.ModuleDict(
        {name: Projector(c.in_dim, hidden_size, c.kind, c.hidden, c.dropout, embed_scale) for name, c in configs.items()}
    )
