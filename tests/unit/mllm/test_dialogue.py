"""One forward pass per dialogue (farcer-dialogue-v1) on a tiny Gemma 3 built from a config: segments, markers,
loss, batched scoring, references, and the leak guard (no gold label reaches the model's input)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mer_ray.mllm.build import ModelConfig, build_mllm
from mer_ray.mllm.dialogue import MARKER, DialogueEncoder, read_references, reference_text
from mer_ray.mllm.examples import Dialogue, PromptConfig
from mer_ray.mllm.model import marker_loss, score_markers
from mer_ray.mllm.predict import MLLMPredictor

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
DIALOGUE = PromptConfig(template="farcer-dialogue-v1", max_tokens=1024, context_turns=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mer_ray.mllm.tiny import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "gemma3", "gemma3", single_token_words=LABELS)


@pytest.fixture(scope="module")
def model_tok(tiny_dir):
    torch.manual_seed(0)
    model, tok = build_mllm(ModelConfig(base=str(tiny_dir)))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), tok


def dialogues(n_dialogues=3, seed=0):
    rng = random.Random(seed)
    out = []
    for k in range(n_dialogues):
        rows = [dict(dialogue_id=f"test/{k}", turn=i, speaker=rng.choice(["Ross", "Rachel"]),
                     text=" ".join(rng.choice(["okay", "so", "we", "are", "going", "what", "coffee", "house"]) for _ in range(rng.randint(2, 9))),
                     label=rng.choice(LABELS)) for i in range(rng.randint(3, 8))]
        out.append(Dialogue(f"test/{k}", rows, [{} for _ in rows]))
    return out


def test_segments_score_every_utterance_once_at_its_marker_and_write_no_label(model_tok):
    _, tok = model_tok
    enc = DialogueEncoder(tok, LABELS, DIALOGUE)
    ds = dialogues()
    segs = [s for d in ds for s in enc.segments(d, train=True)]
    assert [k for s in segs for k in s.keys] == [(d.dialogue_id, r["turn"]) for d in ds for r in d.rows]
    for s in segs:
        ids = s.items
        for m in s.markers:  # each marker position closes "\nEmotion:"
            assert ids[m - len(enc.marker) + 1 : m + 1] == enc.marker
        body = ids[len(enc.head):]
        assert not set(body) & set(enc.label_ids), "a label token was written into the dialogue"
    assert tok.decode(segs[0].items).count(MARKER) == len(ds[0].rows)


def test_a_long_dialogue_is_cut_into_segments_with_unscored_context(model_tok):
    _, tok = model_tok
    d = dialogues(1)[0]
    d.rows = [dict(r, turn=i) for i, r in enumerate(d.rows * 6)]
    d.feats = [{} for _ in d.rows]
    enc = DialogueEncoder(tok, LABELS, DIALOGUE.model_copy(update={"max_tokens": 160}))
    segs = enc.segments(d)
    assert len(segs) > 1 and all(len(s.items) <= 160 for s in segs)
    assert [k[1] for s in segs for k in s.keys] == list(range(len(d.rows)))
    # later segments repeat earlier turns as context: more markers in the text than scored utterances
    assert all(tok.decode(s.items).count(MARKER) > len(s.keys) for s in segs[1:])


def test_multi_token_labels_are_refused_with_the_reason(tiny_dir):
    from mer_ray.mllm.tiny import build_tiny_lm

    model_dir = build_tiny_lm(tiny_dir.parent / "plain", "gemma3")
    _, tok = build_mllm(ModelConfig(base=str(model_dir), lora=None))
    with pytest.raises(ValueError, match="single-token labels"):
        DialogueEncoder(tok, LABELS, DIALOGUE)


def test_marker_loss_is_label_set_cross_entropy_and_label_logits_match_the_full_head(model_tok):
    model, tok = model_tok
    enc = DialogueEncoder(tok, LABELS, DIALOGUE, weights={lab: 1.0 + i for i, lab in enumerate(LABELS)})
    segs = [s for d in dialogues() for s in enc.segments(d, train=True)]
    batch = enc(segs, train=True)
    h = model.hidden(batch)
    hm = h[batch["marker_pos"][:, 0], batch["marker_pos"][:, 1]]
    full = model.logits_from_hidden(hm)[:, batch["label_ids"]]
    torch.testing.assert_close(model.label_logits(hm, batch["label_ids"]), full, rtol=1e-5, atol=1e-5)
    ce = F.cross_entropy(full, batch["marker_label"], reduction="none")
    w = batch["marker_weight"]
    torch.testing.assert_close(marker_loss(model, batch), (w * ce).sum() / w.sum(), rtol=1e-5, atol=1e-6)


def test_batched_scoring_equals_one_dialogue_at_a_time(model_tok):
    model, tok = model_tok
    enc = DialogueEncoder(tok, LABELS, DIALOGUE)
    segs = [s for d in dialogues(4) for s in enc.segments(d)]
    together = score_markers(model, enc(segs))
    alone = torch.cat([score_markers(model, enc([s])) for s in segs])
    assert together.shape == (sum(len(s.keys) for s in segs), len(LABELS))
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)  # right padding never reaches a causal position


def test_shuffled_gold_labels_of_the_predicted_split_change_no_output(model_tok):
    model, tok = model_tok
    pred = MLLMPredictor(model, tok, LABELS, DIALOGUE, [], batch_size=2)
    ds = dialogues(4)
    before = pred.predict(ds, progress=False)
    labels = [r["label"] for d in ds for r in d.rows]
    random.Random(1).shuffle(labels)
    it = iter(labels)
    shuffled = [Dialogue(d.dialogue_id, [dict(r, label=next(it)) for r in d.rows], d.feats) for d in ds]
    assert [r["label"] for d in shuffled for r in d.rows] != [r["label"] for d in ds for r in d.rows]
    after = pred.predict(shuffled, progress=False)
    stripped = pred.predict([Dialogue(d.dialogue_id, [{k: v for k, v in r.items() if k != "label"} for r in d.rows], d.feats) for d in ds],
                            progress=False)
    assert before.keys() == after.keys() == stripped.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
        np.testing.assert_array_equal(before[k], stripped[k])


def test_references_are_written_like_lanterns_and_change_the_prediction(model_tok, tmp_path):
    model, tok = model_tok
    p = np.array([0.62, 0.2, 0.09, 0.05, 0.02, 0.01, 0.01])
    assert reference_text(p, LABELS) == " (reference: neutral 0.62, joy 0.20, surprise 0.09)"
    ds = dialogues(2)
    rows = [{"dialogue_id": d.dialogue_id, "turn": r["turn"], "emotion_probs": list(np.roll(p, r["turn"]))} for d in ds for r in d.rows]
    path = tmp_path / "refs.parquet"
    pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata({"emotion_labels": json.dumps(list(LABELS))}), path)
    refs = read_references(path, LABELS)
    cfg = DIALOGUE.model_copy(update={"references": True})
    enc = DialogueEncoder(tok, LABELS, cfg)
    assert "(reference: " in tok.decode(enc.segments(ds[0], refs)[0].items)
    with pytest.raises(ValueError, match="references"):
        enc.segments(ds[0])
    pred = MLLMPredictor(model, tok, LABELS, cfg, [])
    with_refs = pred.predict(ds, progress=False, references=refs)
    plain = MLLMPredictor(model, tok, LABELS, DIALOGUE, []).predict(ds, progress=False)
    assert any(not np.allclose(with_refs[k], plain[k]) for k in plain)


def test_references_with_gold_columns_are_refused(tmp_path):
    from mer_ray.data.leak import GoldLeakError

    path = tmp_path / "gold.parquet"
    t = pa.Table.from_pylist([{"dialogue_id": "d", "turn": 0, "emotion_probs": [1.0] + [0.0] * 6, "label": "neutral"}])
    pq.write_table(t.replace_schema_metadata({"emotion_labels": json.dumps(list(LABELS))}), path)
    with pytest.raises(GoldLeakError):
        read_references(path, LABELS)
