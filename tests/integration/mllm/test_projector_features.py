"""FARCER's projectors on real features: eGeMAPS (openSMILE) and FER embeddings extracted from clips written
by the test are scaled with train statistics inside the projector, and gradients reach every projector weight."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mer_ray.demo.media import clip
    from mer_ray.features.local import run_local

    base = tmp_path_factory.mktemp("proj")
    rows = []
    for i in range(6):  # one 3-turn dialogue per split half; pitch differs per clip
        clip(base / "media" / f"c{i}.mp4", seconds=1.0, fps=8, width=192, height=144, f0=110.0 + 40 * i, seed=i)
        rows.append(dict(dialogue_id=f"d{i // 3}", turn=i % 3, speaker="AB"[i % 2], text=f"utterance {i}", video=f"c{i}.mp4",
                         label=LABELS[i % 7], split="train"))
    manifest = base / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = run_local(manifest, base / "media", {"n_frames": 2, "text": False})
    assert set(table["status"].to_pylist()) == {"ok"}, table["error"].to_pylist()
    (base / "store").mkdir()
    pq.write_table(table, base / "store" / "part-0.parquet")
    return base, manifest, table


def test_projectors_scale_real_features_and_get_gradients(corpus, tmp_path):
    from mer_ray.mllm.build import ModelConfig
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.examples import Collator, build_example, load_dialogues
    from mer_ray.mllm.projector import ProjectorConfig
    from mer_ray.mllm.tiny import build_tiny_lm
    from mer_ray.mllm.train import fit_projector_scaling, setup_training

    base, manifest, table = corpus
    raw = np.asarray(table["audio_egemaps"].to_pylist(), np.float64)
    std = raw.std(0)
    assert std[std > 0].max() / std[std > 0].min() > 1e3 and np.abs(raw).max() > 100  # realistic scales, not unit ones
    proj = {"visual": ProjectorConfig("face_embedding", 128, "mlp", 16, 0.0), "audio": ProjectorConfig("audio_egemaps", 88)}
    cfg = FinetuneConfig(model=ModelConfig(base=str(build_tiny_lm(tmp_path / "gemma3", "gemma3")), projectors=proj),
                         data={"manifests": {"train": str(manifest)}, "features": str(base / "store")},
                         train={"mode": "projector", "micro_batch": 1}, out=str(tmp_path / "out"))
    ts = setup_training(cfg, world=1)  # the Ray Train worker's set-up: fits the scalers on train
    model = ts.model
    again = fit_projector_scaling(cfg, model)
    np.testing.assert_array_equal(np.float32(again["audio"]["center"]), np.median(raw, 0).astype(np.float32))
    z = model.projectors["audio"].norm(torch.from_numpy(raw))
    assert float(z.abs().max()) <= 5.0 and float(z.abs().max()) > 0.5  # unit scale, not 2,000s
    model.train()
    d = load_dialogues(cfg.data, "train", {m: p.feature for m, p in proj.items()})[0]
    assert all(set(f) == {"visual", "audio"} for f in d.feats)
    batch = Collator(ts.tok, LABELS)([build_example(d, 2, cfg.prompt, LABELS, [])], train=True)
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.projectors.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the statistics are buffers: they travel in the state dict the artifacts write
    state = model.projectors.state_dict()
    assert torch.equal(state["audio.norm.center"], torch.tensor(again["audio"]["center"]))
