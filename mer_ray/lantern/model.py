"""Receptive-field-aware attention fusion (Lantern), plain PyTorch.

Per utterance, the module attends over its candidates: the vanilla distribution
and every LLM distribution from a receptive field covering the utterance. A
candidate's score comes from its features (field size, the utterance's position
in the field, the distribution's confidence); the attention-weighted mean of
the candidates' log-probabilities is mixed with the vanilla log-probabilities
by ``mix``. ``mix`` starts at exactly 0, so the initial module *is* the
vanilla-only solution (and an utterance without LLM candidates always gets the
vanilla distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Per-candidate features, in order (see :func:`candidate_features`).
FEATURES = ("log2_span", "span_over_dialogue", "is_whole", "rel_pos", "is_last", "is_first", "entropy", "max_prob")
EPS = 1e-6


@dataclass
class FusionConfig:
    """Size of the fusion module."""

    n_classes: int
    """Labels ``C``."""
    n_features: int = len(FEATURES)
    """Features ``F`` per LLM candidate."""
    hidden: int = 16
    """Hidden units of the scoring MLP."""

    def __post_init__(self):
        if self.n_classes < 2 or self.n_features < 1 or self.hidden < 1:
            raise ValueError(f"bad FusionConfig {self}")


class RFAttentionFusion(nn.Module):
    """Fuse ``vanilla [N, C]`` with LLM candidates ``llm [N, M, C]`` (``mask [N, M]``, ``feats [N, M, F]``)."""

    def __init__(self, n_classes: int, n_features: int, hidden: int = 16):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.vanilla_score = nn.Parameter(torch.zeros(()))  # the vanilla candidate's attention logit
        self.llm_bias = nn.Parameter(torch.zeros(n_classes))  # per-class correction of LLM log-probs
        self.mix = nn.Parameter(torch.zeros(()))  # 0: vanilla only (the initial solution)

    def attention(self, mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Weights ``[N, 1 + M]`` over (vanilla, LLM candidates); masked candidates get 0."""
        s = self.score(feats).squeeze(-1).masked_fill(~mask, float("-inf"))  # [N, M]
        v = self.vanilla_score.expand(s.shape[0], 1)
        return torch.softmax(torch.cat([v, s], dim=1), dim=1)

    def forward(self, vanilla: torch.Tensor, llm: torch.Tensor, mask: torch.Tensor,
                feats: torch.Tensor) -> torch.Tensor:
        """Fused log-probabilities ``[N, C]``."""
        lv = torch.log(vanilla.clamp_min(EPS))
        ll = torch.log_softmax(torch.log(llm.clamp_min(EPS)) + self.llm_bias, dim=-1)  # [N, M, C]
        ll = ll.masked_fill(~mask[..., None], 0.0)
        a = self.attention(mask, feats)
        pooled = a[:, :1] * lv + (a[:, 1:, None] * ll).sum(1)
        return torch.log_softmax(lv + self.mix * (pooled - lv), dim=-1)


def build_fusion(cfg: FusionConfig) -> RFAttentionFusion:
    return RFAttentionFusion(cfg.n_classes, cfg.n_features, cfg.hidden)


def candidate_features(span: torch.Tensor, dialogue_len: torch.Tensor, rel: torch.Tensor,
                       probs: torch.Tensor) -> torch.Tensor:
    """Features ``[..., F]`` of LLM candidates.

    Args:
        span: field length ``end - start`` (``[...]``).
        dialogue_len: the dialogue's length (``[...]``).
        rel: the utterance's offset in the field, ``pos - start`` (``[...]``).
        probs: the candidate's distribution ``[..., C]``.
    """
    span_f, dl = span.float(), dialogue_len.float().clamp_min(1)
    p = probs.clamp_min(EPS)
    ent = -(p * p.log()).sum(-1) / torch.log(torch.tensor(float(probs.shape[-1])))
    return torch.stack([
        torch.log2(span_f.clamp_min(1)) / 5, span_f / dl, (span >= dialogue_len).float(),
        rel.float() / (span_f - 1).clamp_min(1), (rel == span - 1).float(), (rel == 0).float(),
        ent, probs.max(-1).values,
    ], dim=-1)
