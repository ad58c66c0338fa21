"""The vanilla multi-task context model (Lantern's reference model), plain PyTorch.

One forward pass covers a batch of dialogues. Each utterance gets a vector from
either frozen feature-store columns (text 384-d, optional audio/face with a
per-modality missing mask) or a text encoder fine-tuned end to end on
``"Speaker: text"`` tokens. A BiGRU runs over each dialogue with a
dialogue-local speaker embedding, and three heads read every position:
emotion logits, sentiment logits and valence/arousal/dominance.

Shapes: ``B`` dialogues, ``T`` turns (padded), ``N`` real utterances,
``L`` tokens, ``C`` emotion classes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from mer_ray.features.columns import FIXED_WIDTH, VARIABLE_WIDTH
from mer_ray.features.scaling import FeatureScaler

#: Frozen feature-store columns of fixed width (:data:`mer_ray.features.columns.FIXED_WIDTH`).
MODALITY_DIMS: dict[str, int] = FIXED_WIDTH
#: Frozen columns whose width is the configured encoder's: read from the store at training.
VARIABLE_DIMS: tuple[str, ...] = VARIABLE_WIDTH


class VanillaConfig(BaseModel):
    """Architecture of the vanilla model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    encoder: Literal["frozen", "minilm", "tiny"] = "frozen"
    """Utterance encoder: ``frozen`` reads feature-store columns; ``minilm`` fine-tunes the packaged
    all-MiniLM-L6-v2 on token ids; ``tiny`` is a randomly initialised 2-layer BERT (tests)."""
    modalities: list[str] = Field(default_factory=lambda: ["text_embedding"])
    """Frozen feature columns to use (``frozen``), or extra frozen columns beside the text encoder
    (``minilm``/``tiny``: list only non-text columns, or leave empty)."""
    feature_dims: dict[str, int] = Field(default_factory=dict)
    """Widths of ``image_embedding``/``audio_embedding`` (the encoder's hidden size); training fills
    them from the feature store."""
    scaling: Literal["robust", "none"] = "robust"
    """Frozen features are standardised with train medians/IQRs and clipped at 5 (``robust``,
    :mod:`mer_ray.features.scaling`), or fed raw (``none``: only to measure what scaling buys)."""
    hidden: int = Field(256, ge=8)
    """Width of the utterance projection and of each GRU direction."""
    context: Literal["gru", "none"] = "gru"
    """Dialogue context model: a BiGRU over turns, or none (each utterance alone)."""
    max_speakers: int = Field(9, ge=1)
    """Dialogue-local speaker slots (order of first appearance); later speakers share the last slot."""
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    """Dropout before the GRU and before the heads."""
    n_emotions: int = Field(7, ge=2)
    """Emotion classes (the label set's size)."""
    n_sentiments: int = Field(3, ge=0)
    """Sentiment classes; 0 drops the head."""
    vad: bool = True
    """Whether to have a valence/arousal/dominance regression head."""
    max_tokens: int = Field(48, ge=8)
    """Token budget per utterance for the fine-tuned encoder (``Speaker: text``)."""
    text_context: Literal["utterance", "dialogue"] = "utterance"
    """Fine-tuned encoder input: each utterance alone (``[CLS] u [SEP]``), or consecutive utterances
    of a dialogue packed into one sequence (``[CLS] u1 [SEP] u2 [SEP] ...``, each utterance mean-pooled
    over its own tokens) so words attend across turns at no extra tokens (worse on MELD dev)."""
    window_tokens: int = Field(256, ge=16, le=512)
    """Longest packed sequence (``dialogue`` context); longer dialogues are cut into windows."""
    freeze_embeddings: bool = True
    """Keep the encoder's token embeddings fixed (half of MiniLM's weights; saves optimiser time)."""
    freeze_layers: int = Field(0, ge=0)
    """Keep the encoder's lowest N transformer layers fixed (no backward through them)."""

    @field_validator("modalities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODALITY_DIMS and m not in VARIABLE_DIMS]
        if bad:
            raise ValueError(f"unknown modality columns {bad}; known: {sorted([*MODALITY_DIMS, *VARIABLE_DIMS])}")
        return v

    def dim(self, column: str) -> int:
        """Width of a frozen feature column."""
        if column in MODALITY_DIMS:
            return MODALITY_DIMS[column]
        if column not in self.feature_dims:
            raise ValueError(f"the width of {column!r} is not known: set model.feature_dims.{column} (training reads it from the store)")
        return self.feature_dims[column]


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling over token spans (sentence-transformers style)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.dim = backbone.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """[n, L] ids and mask, [n, U, L] pooling weights (rows sum to 1 over a span) -> [n, U, dim]."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.bmm(pool, h)


class VanillaModel(nn.Module):
    """Utterance encoder -> speaker-aware BiGRU over the dialogue -> emotion/sentiment/VAD heads."""

    def __init__(self, cfg: VanillaConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = text_encoder
        if (cfg.encoder == "frozen") != (text_encoder is None):
            raise ValueError(f"encoder={cfg.encoder!r} needs text_encoder {'None' if cfg.encoder == 'frozen' else 'given'}")
        h = cfg.hidden
        # One projection per input; a missing modality is a learned vector, never zeros taken as data.
        # Each input is scaled first (statistics fitted on train, saved with the weights).
        self.scalers = nn.ModuleDict({m: FeatureScaler(cfg.dim(m)) for m in cfg.modalities})
        self.proj = nn.ModuleDict({m: nn.Linear(cfg.dim(m), h) for m in cfg.modalities})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(h)) for m in cfg.modalities})
        if text_encoder is not None:
            self.text_proj = nn.Linear(text_encoder.dim, h)
        self.speaker = nn.Embedding(cfg.max_speakers, h)
        self.drop = nn.Dropout(cfg.dropout)
        out = h
        if cfg.context == "gru":
            self.gru = nn.GRU(h, h, batch_first=True, bidirectional=True)
            out = 3 * h  # utterance vector beside both GRU directions
        self.emotion_head = nn.Sequential(nn.Linear(out, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, cfg.n_emotions))
        self.sentiment_head = nn.Linear(out, cfg.n_sentiments) if cfg.n_sentiments else None
        self.vad_head = nn.Linear(out, 3) if cfg.vad else None

    def set_scaling(self, stats: dict[str, dict]) -> None:
        """Load per-column statistics (``{column: fit_scaling(...)}``) into the scalers."""
        for m, scaler in self.scalers.items():
            if m not in stats:
                raise ValueError(f"no scaling statistics for {m!r} (have {sorted(stats)})")
            scaler.set_stats(stats[m])

    def utterance_vectors(self, batch: dict) -> torch.Tensor:
        """Per-turn vectors [B, T, H] from frozen columns and/or the text encoder."""
        utt_mask = batch["utt_mask"]
        x = torch.zeros(*utt_mask.shape, self.cfg.hidden, dtype=torch.float32, device=utt_mask.device)
        for m in self.cfg.modalities:
            present = batch[f"{m}_mask"].unsqueeze(-1)  # [B, T, 1]
            v = batch[m] if self.cfg.scaling == "none" else self.scalers[m](batch[m])
            x = x + torch.where(present, self.proj[m](v), self.missing[m].expand_as(x))
        if self.text_encoder is not None:
            # Utterances arrive as length-sorted chunks; scatter them back to [N, dim] in row-major order.
            n = int(utt_mask.sum())
            flat = torch.zeros(n, self.text_encoder.dim, device=utt_mask.device)
            for ids, att, pool, sel, pos in batch["chunks"]:
                flat[pos] = self.text_encoder(ids, att, pool).reshape(-1, self.text_encoder.dim)[sel]
            b, t = utt_mask.nonzero(as_tuple=True)
            x = x.index_put((b, t), self.text_proj(flat), accumulate=True)
        return x

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Logits per turn.

        Args:
            batch: ``utt_mask`` [B, T] bool, ``speaker`` [B, T] long; per frozen modality ``m``:
                ``m`` [B, T, d] float and ``m_mask`` [B, T] bool; with a text encoder ``chunks``:
                a list of (ids [n, L], attention [n, L], pool [n, U, L], sel [k], pos [k]): pooled span
                ``sel`` (index into n*U) is real utterance ``pos`` (index into the N, row-major).

        Returns:
            ``emotion`` [B, T, C] logits, ``sentiment`` [B, T, S] logits (if the head exists),
            ``vad`` [B, T, 3] (if the head exists). Padded positions hold garbage; mask with utt_mask.
        """
        u = self.utterance_vectors(batch)
        feats = u
        if self.cfg.context == "gru":
            x = self.drop(u + self.speaker(batch["speaker"]))
            lengths = batch["utt_mask"].sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            ctx, _ = self.gru(packed)
            ctx, _ = nn.utils.rnn.pad_packed_sequence(ctx, batch_first=True, total_length=x.shape[1])
            feats = torch.cat([u, ctx], dim=-1)
        feats = self.drop(feats)
        out = {"emotion": self.emotion_head(feats)}
        if self.sentiment_head is not None:
            out["sentiment"] = self.sentiment_head(feats)
        if self.vad_head is not None:
            out["vad"] = self.vad_head(feats)
        return out


def multitask_loss(out: dict, batch: dict, sentiment_weight: float = 0.5, vad_weight: float = 0.5,
                   label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Masked multi-task loss. Targets: ``emotion``/``sentiment`` [B, T] long (-1 = missing),
    ``vad`` [B, T, 3] float with ``vad_mask`` [B, T, 3] bool. Missing labels contribute nothing."""
    emo = batch["emotion"]
    losses = {"emotion": F.cross_entropy(out["emotion"][emo >= 0], emo[emo >= 0], weight=class_weight,
                                         label_smoothing=label_smoothing) if (emo >= 0).any() else out["emotion"].sum() * 0}
    total = losses["emotion"]
    if "sentiment" in out and "sentiment" in batch and (batch["sentiment"] >= 0).any():
        s = batch["sentiment"]
        losses["sentiment"] = F.cross_entropy(out["sentiment"][s >= 0], s[s >= 0])
        total = total + sentiment_weight * losses["sentiment"]
    if "vad" in out and "vad_mask" in batch and batch["vad_mask"].any():
        m = batch["vad_mask"]
        losses["vad"] = F.mse_loss(out["vad"][m], batch["vad"][m])
        total = total + vad_weight * losses["vad"]
    losses["total"] = total
    return losses


def build_text_encoder(cfg: VanillaConfig, pretrained: bool = True) -> MeanPooledEncoder | None:
    """The utterance text encoder a config names (None for ``frozen``).

    ``pretrained=False`` builds the MiniLM architecture without reading its weights (for loading a
    fine-tuned state dict)."""
    if cfg.encoder == "frozen":
        return None
    from transformers import AutoConfig, AutoModel, BertConfig

    if cfg.encoder == "tiny":
        bc = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
        backbone = AutoModel.from_config(bc)
    else:
        from mer_ray.vanilla.tokens import minilm_dir

        path = str(minilm_dir())
        backbone = AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(AutoConfig.from_pretrained(path))
    if cfg.freeze_embeddings:
        backbone.embeddings.requires_grad_(False)
    for layer in backbone.encoder.layer[: cfg.freeze_layers]:
        layer.requires_grad_(False)
    return MeanPooledEncoder(backbone)


def build_vanilla(cfg: VanillaConfig, pretrained: bool = True) -> VanillaModel:
    """A :class:`VanillaModel` from its config."""
    return VanillaModel(cfg, build_text_encoder(cfg, pretrained=pretrained))
