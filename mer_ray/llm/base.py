"""The one small LLM interface: a probability distribution over a label set per prompt.

A backend never returns free text. For each prompt it scores every label string
``l`` (its answer verbalization, e.g. ``" joy"``) exactly, as the joint
log-probability of the label's own tokens where they follow the prompt,
``log P(l | prompt) = sum_i log p(t_i | prompt, t_<i)``, and normalises over the
label set. Multi-token labels are scored token by token, never by their first
token only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class LabelScores:
    """The scores of one prompt.

    Attributes:
        probs: ``[C]`` float64, the label distribution (sums to 1); ``None`` when ``error`` is set.
        logprobs: ``[C]`` float64, unnormalised joint log-probability of each label's tokens.
        n_prompt_tokens: tokens in the prompt.
        tokens_evaluated: tokens the model actually evaluated for this prompt (suffix + label tokens).
        tokens_reused: prompt tokens served from a KV cache (shared prefix), not evaluated.
        error: why this prompt could not be scored (context overflow, backend error), else ``None``.
    """

    probs: np.ndarray | None
    logprobs: np.ndarray | None = None
    n_prompt_tokens: int = 0
    tokens_evaluated: int = 0
    tokens_reused: int = 0
    error: str | None = None
    label_tokens: list[list[int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class LabelScorer(Protocol):
    """What every backend implements."""

    #: Human-readable backend/model identifier, recorded with every output row.
    name: str

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, or ``None`` (base models, raw endpoints)."""

    def score(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        """Score ``labels`` after each prompt; one :class:`LabelScores` per prompt, in order."""


def normalise(logprobs: np.ndarray) -> np.ndarray:
    """Softmax over the label axis of joint label log-probabilities (``[..., C]``)."""
    z = logprobs - logprobs.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def label_continuations(tokenize, prompt: str, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label where it actually follows ``prompt``.

    Tokenises ``prompt + label`` and keeps what follows the prompt's own tokens, so a
    label after a chat template's newline is split the way the model sees it. If the
    tokenizer merges across the boundary (the prompt's tokens are not a prefix), the
    label is tokenised on its own, without BOS.

    Args:
        tokenize: ``(text, add_bos) -> list[int]``.
        prompt: the rendered prompt.
        labels: the label strings (verbalizations).
    """
    base = tokenize(prompt, True)
    out = []
    for lab in labels:
        full = tokenize(prompt + lab, True)
        if full[: len(base)] == base and len(full) > len(base):
            toks = list(full[len(base):])
        else:
            toks = list(tokenize(lab, False))
        if not toks:
            raise ValueError(f"label {lab!r} has no tokens after the prompt")
        out.append(toks)
    return out


class LabelTrie:
    """Label token sequences as a trie, so shared leading tokens are evaluated once."""

    def __init__(self, label_tokens: Sequence[Sequence[int]]):
        self.root: dict = {}
        for i, toks in enumerate(label_tokens):
            node = self.root
            for t in toks:
                node = node.setdefault(t, {})
            node.setdefault(None, []).append(i)  # label i ends here

    @staticmethod
    def children(node: dict) -> list[tuple[int, dict]]:
        return [(t, n) for t, n in node.items() if t is not None]
