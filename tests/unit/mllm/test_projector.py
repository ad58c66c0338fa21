"""Projectors: shapes, kinds, embedding scale, validation."""

from __future__ import annotations

import pytest
import torch

from mer_ray.mllm.projector import Projector, ProjectorConfig, build_projectors, embed_scale_of


def test_linear_and_mlp_shapes_and_layers():
    torch.manual_seed(0)
    lin = Projector(128, 32, "linear")
    mlp = Projector(88, 32, "mlp", hidden=16, dropout=0.1)
    assert isinstance(lin.net, torch.nn.Linear)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert lin(torch.randn(5, 128)).shape == (5, 32)
    assert mlp(torch.randn(3, 88)).shape == (3, 32)


def test_embed_scale_multiplies_output():
    torch.manual_seed(0)
    a = Projector(8, 4, "linear", embed_scale=1.0)
    b = Projector(8, 4, "linear", embed_scale=5.0)
    b.load_state_dict({**a.state_dict(), "embed_scale": torch.tensor(5.0)})
    x = torch.randn(2, 8)
    assert torch.equal(b(x), 5.0 * a(x))  # net(x) * 5.0 vs 5.0 * (net(x) * 1.0): the same rounded product


def test_embed_scale_of_gemma_matches_sqrt_hidden(tmp_path):
    from transformers import AutoModelForCausalLM

    from mer_ray.mllm.tiny import build_tiny_lm

    lm = AutoModelForCausalLM.from_pretrained(build_tiny_lm(tmp_path / "g", "gemma3", hidden=32))
    assert embed_scale_of(lm) == float(torch.tensor(32**0.5, dtype=torch.float32))  # Gemma's float32 sqrt(hidden)
    llama = AutoModelForCausalLM.from_pretrained(build_tiny_lm(tmp_path / "l", "llama", hidden=32))
    assert embed_scale_of(llama) == 1.0


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="width 128"):
        Projector(128, 4)(torch.randn(2, 88))


@pytest.mark.parametrize("kw,msg", [({"kind": "conv"}, "kind"), ({"in_dim": 0}, "positive"), ({"dropout": 1.5}, "dropout")])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ProjectorConfig(**{"feature": "face_embedding", "in_dim": 128, **kw})


def test_build_projectors_one_per_modality():
    mods = build_projectors({"visual": ProjectorConfig("face_embedding", 128, "mlp", 16), "audio": ProjectorConfig("audio_egemaps", 88)}, 32, 2.0)
    assert set(mods) == {"visual", "audio"}
    assert float(mods["audio"].embed_scale) == 2.0
