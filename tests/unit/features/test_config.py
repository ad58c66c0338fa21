"""ExtractConfig: validation that names the bad field, per-stage resources, and the stage plan."""

from __future__ import annotations

import pytest

from mer_ray.config import ConfigError, load
from mer_ray.features.config import ExtractConfig
from mer_ray.features.stages import build_stages


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="n_frames"):
        load(ExtractConfig, {"n_frames": 0})
    with pytest.raises(ConfigError, match="num_cpus"):
        load(ExtractConfig, {"face": {"num_cpus": -1}})
    with pytest.raises(ConfigError, match="no_such_field"):
        load(ExtractConfig, {"no_such_field": 1})
    with pytest.raises(ConfigError, match="audio_model_dir"):
        load(ExtractConfig, {"audio_encoder": "hf"})
    p = tmp_path / "cfg.yaml"
    p.write_text("n_frames: 4\nexpression: {num_gpus: 1, num_cpus: 1}\n")
    assert load(ExtractConfig, p).n_frames == 4


def test_stage_plan_resources_and_devices():
    cfg = ExtractConfig(expression={"num_gpus": 0.5}, text_stage={"num_gpus": 1, "pool_size": 2},
                        image_model_dir="/models/vit")
    stages = {s.name: s for s in build_stages(cfg, "/media", has_media=True)}
    assert list(stages) == ["decode", "face", "expression", "image", "audio", "text"]
    assert stages["expression"].kwargs["device"] == "cuda" and stages["audio"].kwargs["device"] == "cpu"
    assert stages["text"].resources.pool_size == 2 and stages["text"].kwargs["device"] == "cuda"
    # Frames stay until the last stage that reads them; then they are dropped.
    assert "_frames" not in stages["face"].drop and "_frames" in stages["image"].drop
    assert "_audio" in stages["audio"].drop
    text_only = build_stages(cfg, "/media", has_media=False)
    assert [s.name for s in text_only] == ["text"]


def test_output_relevant_settings_change_the_hash():
    a, b = ExtractConfig(), ExtractConfig(face={"pool_size": 3})
    assert a.sha256() == b.sha256()  # resources do not change the features
    assert a.sha256() != ExtractConfig(n_frames=4).sha256()
