"""Unit tests of the vanilla model (plain PyTorch, no Ray): shapes, masking, a tiny overfit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mer_ray.vanilla.batches import collate, dialogues_from_table, length_batches, speaker_slots
from mer_ray.vanilla.model import VanillaConfig, build_vanilla, multitask_loss
from mer_ray.vanilla.steps import build_optimizer, predict_dialogues, train_step

EMO = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
SENT = ["neutral", "positive", "negative"]


def _table(n_dialogues=3, turns=(3, 5, 2), audio_missing=(), seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_dialogues):
        for t in range(turns[d % len(turns)]):
            i = len(rows)
            rows.append({"dialogue_id": f"d{d}", "turn": t * 2, "speaker": "AB"[t % 2], "text": f"utterance {i}",
                         "text_embedding": rng.normal(size=384).astype(np.float32).tolist(),
                         "audio_egemaps": None if i in audio_missing else rng.normal(size=88).tolist(),
                         "label": EMO[i % 7], "sentiment": SENT[i % 3],
                         "valence": None if i % 2 else 0.5, "arousal": None, "dominance": None})
    return pa.Table.from_pylist(rows)


def _cfg(**kw) -> VanillaConfig:
    return VanillaConfig(**{"modalities": ["text_embedding", "audio_egemaps"], "hidden": 16, "dropout": 0.0, **kw})


def test_shapes_frozen_and_grouping():
    cfg = _cfg()
    dialogues = dialogues_from_table(_table(), cfg, EMO, SENT)
    assert [len(d) for d in dialogues] == [3, 5, 2]
    assert dialogues[1].turns == [0, 2, 4, 6, 8]  # turn gaps kept, order by turn
    torch.manual_seed(0)
    model = build_vanilla(cfg)
    batch = collate(dialogues, cfg)
    out = model(batch)
    assert out["emotion"].shape == (3, 5, 7)
    assert out["sentiment"].shape == (3, 5, 3)
    assert out["vad"].shape == (3, 5, 3)
    assert batch["utt_mask"].sum() == 10
    assert batch["emotion"][2, 2:].eq(-1).all()  # padding carries no target


@pytest.fixture()
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("context", ["utterance", "dialogue"])
def test_tiny_encoder_shapes_and_chunk_order(context, float64_default):
    # Batched (length-sorted chunks, padded) and alone run other matrix shapes, so their sums round
    # differently; the comparison runs in float64 so that difference has a bound: dot products of <= 64
    # terms through 2 small layers (|logits| < 1) reorder to within ~1e-13 (u = 2**-53) on any CPU, far
    # below 1e-10, while a chunk scattered to the wrong turn or a padding leak moves logits by > 1e-3.
    # (The frozen text_embedding column makes utterance_vectors' float32 start promote to float64.)
    cfg = VanillaConfig(encoder="tiny", modalities=["text_embedding"], hidden=16, dropout=0.0, text_context=context,
                        window_tokens=16)
    dialogues = dialogues_from_table(_table(), cfg, EMO, SENT)
    torch.manual_seed(0)
    model = build_vanilla(cfg).eval()
    batch = collate(dialogues, cfg, chunk_tokens=20)
    assert len(batch["chunks"]) > 1
    assert sorted(int(p) for c in batch["chunks"] for p in c[4]) == list(range(10))  # every utterance pooled once
    batched = model(batch)["emotion"]
    assert batched.shape == (3, 5, 7) and batched.dtype == torch.float64
    assert batched.abs().max() < 1
    for b, d in enumerate(dialogues):  # length-sorted chunks scatter back to the right turns
        alone = model(collate([d], cfg, chunk_tokens=4096))["emotion"][0, : len(d)]
        torch.testing.assert_close(batched[b, : len(d)], alone, atol=1e-10, rtol=0)


def test_dialogue_context_packs_turns_into_one_sequence():
    cfg = VanillaConfig(encoder="tiny", modalities=[], text_context="dialogue", window_tokens=256)
    d = dialogues_from_table(_table(), cfg)
    chunks = collate(d[:1], cfg)["chunks"]
    ids, att, pool, sel, pos = chunks[0]
    assert ids.shape[0] == 1 and pool.shape[1] == 3  # 3 turns, one sequence
    # each row: n copies of float32 1/n summed: within n * 2**-24 of 1 (default float32 tolerance 1e-5)
    torch.testing.assert_close(pool.sum(-1), torch.ones(1, 3))
    assert (pool > 0).sum(-1).tolist() == [[len(t) + 1 for t in d[0].token_ids]]


def test_missing_modality_is_masked_not_zero():
    cfg = _cfg()
    table = _table(audio_missing={0})
    d = dialogues_from_table(table, cfg)
    assert not d[0].present["audio_egemaps"][0] and d[0].present["audio_egemaps"][1]
    torch.manual_seed(0)
    model = build_vanilla(cfg).eval()
    with torch.no_grad():
        model.missing["audio_egemaps"].fill_(0.7)
        batch = collate(d, cfg)
        ref = model(batch)["emotion"]
        # whatever sits in a missing slot is ignored ...
        batch["audio_egemaps"][0, 0] = 123.0
        assert torch.equal(model(batch)["emotion"], ref)
        # ... and a missing feature differs from a present all-zeros feature
        batch["audio_egemaps"][0, 0] = 0.0
        batch["audio_egemaps_mask"][0, 0] = True
        assert not torch.allclose(model(batch)["emotion"][0, 0], ref[0, 0])  # a modelling difference, not rounding


def test_scaling_is_applied_before_the_projection_and_missing_stays_missing():
    from mer_ray.features.scaling import fit_scaling

    cfg = _cfg()
    d = dialogues_from_table(_table(audio_missing={0}), cfg)
    torch.manual_seed(0)
    model = build_vanilla(cfg).eval()
    with torch.no_grad():
        batch = collate(d, cfg)
        raw = model(batch)["emotion"]
        x = batch["audio_egemaps"][batch["audio_egemaps_mask"]].numpy() * 100.0 + 2700.0  # eGeMAPS-like scale
        st = {"text_embedding": fit_scaling(batch["text_embedding"][batch["utt_mask"]].numpy()), "audio_egemaps": fit_scaling(x)}
        model.set_scaling(st)
        batch["audio_egemaps"] = batch["audio_egemaps"] * 100.0 + 2700.0
        scaled = model(batch)["emotion"]
        # the proj layer sees clip((x - median) / (IQR / 1.349)): the same as the raw model on those inputs
        z = model.scalers["audio_egemaps"](batch["audio_egemaps"])
        assert float(z[batch["audio_egemaps_mask"]].abs().max()) <= 5.0 and abs(float(z[batch["audio_egemaps_mask"]].median())) < 0.1
        # the missing slot (zero-filled raw, 2700 after the affine map) is still the learned missing vector
        batch["audio_egemaps"][0, 0] = -1e6
        assert torch.equal(model(batch)["emotion"], scaled)
        assert not torch.allclose(scaled, raw)


def test_vad_loss_masked_where_label_missing():
    cfg = _cfg()
    d = dialogues_from_table(_table(), cfg, EMO, SENT)
    torch.manual_seed(0)
    model = build_vanilla(cfg)
    batch = collate(d, cfg)
    assert batch["vad_mask"].any() and not batch["vad_mask"].all()
    out = model(batch)
    loss = multitask_loss(out, batch)["vad"]
    batch2 = dict(batch, vad=torch.where(batch["vad_mask"], batch["vad"], torch.full_like(batch["vad"], 1e6)))
    assert torch.equal(multitask_loss(out, batch2)["vad"], loss)
    # no VAD labels at all: no VAD term
    batch3 = dict(batch, vad_mask=torch.zeros_like(batch["vad_mask"]))
    assert "vad" not in multitask_loss(out, batch3)


def test_speaker_slots():
    assert speaker_slots(["x", "y", "x", "z", "w"], 3) == [0, 1, 0, 2, 2]


def test_length_batches_cover_every_dialogue_once():
    cfg = _cfg()
    d = dialogues_from_table(_table(n_dialogues=7), cfg)
    batches = length_batches(d, 6, np.random.default_rng(0))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(sum(len(d[i]) for i in b) <= 6 or len(b) == 1 for b in batches)


def test_unknown_label_names_the_row():
    table = _table().set_column(6, "label", pa.array(["joy"] * 9 + ["happyish"]))
    with pytest.raises(ValueError, match="happyish.*d2"):
        dialogues_from_table(table, _cfg(), EMO)


def test_tiny_overfit():
    cfg = _cfg(hidden=32)
    d = dialogues_from_table(_table(n_dialogues=4), cfg, EMO, SENT)
    torch.manual_seed(0)
    model = build_vanilla(cfg)
    opt = build_optimizer(model, lr=2e-2, lr_encoder=1e-4, weight_decay=0.0)
    batch = collate(d, cfg)
    first = None
    for _ in range(60):
        loss = train_step(model, batch, opt, None, sentiment_weight=0.5, vad_weight=0.5, label_smoothing=0.0, grad_clip=1.0)
        first = first if first is not None else loss["emotion"]
    assert loss["emotion"] < 0.05 * first
    probs = predict_dialogues(model, d, cfg)
    pred = np.concatenate([p["emotion_probs"].argmax(-1) for p in probs])
    assert (pred == np.concatenate([x.emotion for x in d])).all()
    np.testing.assert_allclose(probs[0]["emotion_probs"].sum(-1), 1.0, rtol=1e-5)  # float32 softmax: < 1e-6


def test_config_rejects_unknown_modality():
    with pytest.raises(ValueError, match="unknown modality"):
        VanillaConfig(modalities=["lidar"])
