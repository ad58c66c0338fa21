"""Every shipped Lantern YAML loads against its entry point's config."""

from __future__ import annotations

from pathlib import Path

from mer_ray.config import load
from mer_ray.lantern.config import FuseConfig, PromptJobConfig

JOBS = Path(__file__).resolve().parents[3] / "jobs"


def test_shipped_lantern_yamls_validate():
    p = load(PromptJobConfig, JOBS / "lantern_prompt.yaml", {"vanilla": "v.parquet", "out": "o", "backend.model": "gemma3-270m"})
    assert p.sizes == [4, None] and p.backend.model == "gemma3-270m" and p.backend.kind == "llama_cpp"
    f = load(FuseConfig, JOBS / "lantern_fuse.yaml", {"vanilla": "v.parquet", "llm": ["a"], "out": "o"})
    assert f.folds == 5 and f.llm == ["a"]
    for path in JOBS.glob("lantern_*.yaml"):  # the vLLM file is config only (tests/unit/lantern/test_vllm_config.py)
        assert path.read_text().startswith("# mer lantern " if "vllm" not in path.name else "# no command runs this file here"), path
