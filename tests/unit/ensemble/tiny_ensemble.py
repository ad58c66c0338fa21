"""A tiny ``mer ensemble`` run directory for tests outside this package (serving, benchmarks).

The builders are those of ``test_predict_corpus.py`` (3 tiny vanilla seeds, a tiny FARCER and a tiny
Lantern x FARCER, a saved fusion with its mix opened), re-exported here so that other tests build exactly
the ensemble ``mer predict ensemble`` is tested on.
"""

from __future__ import annotations

from pathlib import Path

from tests.unit.ensemble.test_predict_corpus import LABELS, _fusion, _llm_members, _manifest, _vanilla_seeds

__all__ = ["LABELS", "build_tiny_ensemble", "write_manifest"]


def build_tiny_ensemble(root: Path) -> Path:
    """Write a tiny ensemble run under ``root / "ensemble"`` (the tiny LM under ``root / "tiny_lm"``); its path."""
    from mer_ray.mllm.tiny import build_tiny_lm

    ens = root / "ensemble"
    _vanilla_seeds(ens)
    _llm_members(ens, build_tiny_lm(root / "tiny_lm", "gemma3", single_token_words=tuple(LABELS)))
    _fusion(ens)
    return ens


def write_manifest(path: Path) -> list[dict]:
    """A 4-dialogue CSV manifest (some rows unlabelled); its rows."""
    return _manifest(path)
