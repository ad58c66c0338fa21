"""The shipped vLLM-engine YAML builds a ``vLLMEngineProcessorConfig`` (no vLLM, no ``build_processor``)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

JOBS = Path(__file__).resolve().parents[3] / "jobs"


def test_vllm_yaml_constructs_the_processor_config_without_vllm():
    from ray.data.llm import vLLMEngineProcessorConfig

    cfg = yaml.safe_load((JOBS / "lantern_prompt_vllm.yaml").read_text())
    proc = vLLMEngineProcessorConfig(**cfg["processor"])
    assert proc.engine_kwargs["enable_prefix_caching"] is True
    assert proc.should_continue_on_error and proc.batch_size == 64
    assert cfg["sampling_params"] == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    assert "vllm" not in sys.modules  # constructing the config needs no vLLM; the CPU install has none
    assert "no command runs this file here" in (JOBS / "lantern_prompt_vllm.yaml").read_text().splitlines()[0]


def test_http_yaml_selects_the_ray_data_http_backend_and_forbids_unknown_keys():
    import pytest

    from mer_ray.config import ConfigError, load
    from mer_ray.lantern.config import PromptJobConfig

    p = load(PromptJobConfig, JOBS / "lantern_prompt_http.yaml", {"vanilla": "v.parquet", "out": "o"})
    assert p.backend == "ray_data_http" and p.http.mode == "forced" and p.http.max_retries == 3
    with pytest.raises(ConfigError, match="retries"):
        load(PromptJobConfig, JOBS / "lantern_prompt_http.yaml", {"http.retries": 3})
    with pytest.raises(ConfigError, match="ray_data_http only"):
        load(PromptJobConfig, {"http": {"model": "m"}})
