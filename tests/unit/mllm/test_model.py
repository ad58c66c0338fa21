"""The multimodal LLM on a tiny Gemma 3 built from a config: interleaving, loss, exact label scoring, artifacts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mer_ray.mllm.artifacts import load_artifacts, save_artifacts
from mer_ray.mllm.build import ModelConfig, build_mllm, trainable_groups
from mer_ray.mllm.examples import Collator, Dialogue, PromptConfig, build_example, class_weights, sample_shots
from mer_ray.mllm.model import generate_explanation, score_labels, weighted_label_loss
from mer_ray.mllm.projector import ProjectorConfig

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
PROJ = {"visual": ProjectorConfig("face_embedding", 128, "mlp", 16, 0.0), "audio": ProjectorConfig("audio_egemaps", 88)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mer_ray.mllm.tiny import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "gemma3", "gemma3")


@pytest.fixture()
def model_tok(tiny_dir):
    torch.manual_seed(0)
    model, tok = build_mllm(ModelConfig(base=str(tiny_dir), projectors=PROJ))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), tok


def dialogue(n=4, feats=True):
    rng = np.random.default_rng(0)
    rows = [dict(dialogue_id="d1", turn=i, speaker="Ross" if i % 2 else "Rachel", text=f"oh my god, that is so great {i}", label=LABELS[i % 7])
            for i in range(n)]
    fs = [
        {"visual": rng.normal(size=128).astype(np.float32)},
        {},
        {"visual": rng.normal(size=128).astype(np.float32), "audio": rng.normal(size=88).astype(np.float32)},
        {"audio": rng.normal(size=88).astype(np.float32)},
    ]
    return Dialogue("d1", rows, fs[:n] if feats else [{} for _ in range(n)])


def test_interleaving_puts_projected_vectors_in_their_slots(model_tok):
    model, tok = model_tok
    d = dialogue()
    col = Collator(tok, LABELS)
    ex = build_example(d, 3, PromptConfig(context_turns=3), LABELS, [])
    batch = col([ex])
    # utterance 0: visual; 1: none; 2: visual + audio; 3: audio -> 2 visual slots, 2 audio slots, nothing zero-filled
    assert batch["pos_visual"].shape == (2, 2) and batch["pos_audio"].shape == (2, 2)
    assert batch["feat_visual"].shape == (2, 128) and batch["feat_audio"].shape == (2, 88)
    plain = col([build_example(dialogue(feats=False), 3, PromptConfig(context_turns=3), LABELS, [])])
    assert plain["input_ids"].shape[1] == batch["input_ids"].shape[1] - 4
    assert "pos_visual" not in plain
    # order within a turn: visual before audio before the text (v_i, a_i, u_i)
    v2, a2 = batch["pos_visual"][1, 1], batch["pos_audio"][0, 1]
    assert v2 + 1 == a2
    emb = model.embed(batch)
    with torch.no_grad():
        want = model.projectors["visual"](batch["feat_visual"])
        assert torch.equal(emb[0, batch["pos_visual"][:, 1]], want)  # the same projector call on the same rows
        text = model.causal.get_input_embeddings()(batch["input_ids"])
    is_slot = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
    is_slot[batch["pos_visual"][:, 1]] = True
    is_slot[batch["pos_audio"][:, 1]] = True
    assert torch.equal(emb[0, ~is_slot], text[0, ~is_slot])  # the same embedding lookup and scale


def test_projected_vectors_are_on_the_text_embedding_scale(model_tok):
    model, tok = model_tok
    scale = float(model.projectors["visual"].embed_scale)
    # Gemma multiplies token embeddings by sqrt(hidden), held as a float32 tensor: that value, exactly
    assert scale == float(torch.tensor(32**0.5, dtype=torch.float32))
    # inputs_embeds built by embed() give the same hidden states as feeding input_ids (text only)
    col = Collator(tok, LABELS)
    batch = col([build_example(dialogue(feats=False), 2, PromptConfig(), LABELS, [])])
    with torch.no_grad():
        ours = model.hidden(batch)
        ref = model.causal.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.equal(ours, ref)  # the decoder on the same embeddings (lookup * scale) and mask


def test_loss_is_class_weighted_ce_on_label_tokens_only(model_tok):
    model, tok = model_tok
    d = dialogue()
    weights = {lab: float(i + 1) for i, lab in enumerate(LABELS)}
    col = Collator(tok, LABELS, weights)
    exs = [build_example(d, i, PromptConfig(), LABELS, []) for i in (1, 2)]
    batch = col(exs, train=True)
    for b, ex in enumerate(exs):
        toks = col.label_tokens[LABELS.index(ex.label)]
        sel = batch["labels"][b] != -100
        assert batch["labels"][b][sel].tolist() == toks  # only the label's sub-word tokens
        assert torch.equal(batch["loss_weights"][b][sel], torch.full((len(toks),), weights[ex.label] / len(toks)))
    # The loss runs the LM head on the selected rows, the reference on every position: other matrix shapes,
    # so other rounding. In a float64 copy the hidden states agree to ~1e-13; logits_from_hidden and
    # .float() round both to the same float32 logits or 1-ulp neighbours (|logit| < 8: <= 2**-21), CE
    # is 2-Lipschitz in them, and the float32 weighted means differ by a few ulp: < 1e-5 on any CPU.
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model.causal(inputs_embeds=model.embed(batch), attention_mask=batch["attention_mask"]).logits.float()
        assert logits.abs().max() < 8
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:].clamp_min(0), reduction="none")
        w = batch["loss_weights"][:, 1:] * (batch["labels"][:, 1:] != -100)
        want = (w * ce).sum() / w.sum()
        torch.testing.assert_close(weighted_label_loss(model, batch).float(), want, rtol=0, atol=1e-5)


def test_gradients_reach_projectors_and_lora_only(model_tok):
    model, tok = model_tok
    model.train()
    batch = Collator(tok, LABELS)([build_example(dialogue(), 3, PromptConfig(), LABELS, [])], train=True)
    model(batch).backward()
    groups = trainable_groups(model)
    assert set(groups) == {"projector", "lora"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projectors["visual"].parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["lora"])
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_score_labels_is_exact_teacher_forced_probability(model_tok):
    model, tok = model_tok
    col = Collator(tok, LABELS)
    assert any(len(t) > 1 for t in col.label_tokens)  # the tiny BPE splits labels: the multi-token path runs
    exs = [build_example(dialogue(feats=False), i, PromptConfig(), LABELS, []) for i in (0, 3)]
    # score_labels (a padded batch, then each label's tokens after its prompt) and the brute force (one
    # unpadded sequence per label) run other matrix shapes. In a float64 copy they agree to ~1e-13 before
    # logits_from_hidden's .float(); after it each side's float32 label score (|s| < 64, a few roundings)
    # is within ~8 ulp (2**-18) of the other, and softmax turns |ds| <= 4e-5 into |dp| <= 2 p |ds| + ulp:
    # rtol=1e-4, atol=1e-6 holds on any CPU.
    model = copy.deepcopy(model).double()
    probs = score_labels(model, col(exs), col.label_tokens)
    assert probs.shape == (2, 7)
    # float32 softmax over 7 labels: |sum - 1| <= ~10 * 2**-24 (default float32 tolerance: 1e-5 + 1.3e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    # brute force: full sequence prompt + label through input_ids, sum of log-probs of the label tokens
    for b, ex in enumerate(exs):
        prompt = [x for x in col.prompt_items(ex)]
        scores = []
        for toks in col.label_tokens:
            ids = torch.tensor([prompt + toks])
            with torch.no_grad():
                lp = model.causal(input_ids=ids).logits[0].float().log_softmax(-1)
            scores.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(toks)))
        assert max(abs(x) for x in scores) < 64
        torch.testing.assert_close(probs[b], torch.tensor(scores).softmax(-1), rtol=1e-4, atol=1e-6)


def test_prompt_past_labels_shots_and_context(model_tok):
    _, tok = model_tok
    d = dialogue(4, feats=False)
    gold = [r["label"] for r in d.rows]
    ex = build_example(d, 3, PromptConfig(past_labels=True, context_turns=2), LABELS, [("wow", "joy")], gold)
    text = "".join(p for part in [ex.header, *ex.turns, ex.target] for p in part if isinstance(p, str))
    assert f"(emotion: {gold[1]})" in text and f"(emotion: {gold[2]})" in text
    assert f"(emotion: {gold[3]})" not in text  # never the target's own label
    assert "that is so great 0" not in text  # context_turns=2 keeps turns 1, 2
    assert 'Example: "wow"\nEmotion: joy' in text
    no_past = build_example(d, 3, PromptConfig(past_labels=False), LABELS, [], gold)
    assert "(emotion:" not in "".join(p for t in no_past.turns for p in t if isinstance(p, str))
    # max_tokens drops the earliest turns first
    col = Collator(tok, LABELS, max_tokens=120)
    full = Collator(tok, LABELS, max_tokens=2000)
    long_ex = build_example(d, 3, PromptConfig(context_turns=3), LABELS, [])
    assert len(col.prompt_items(long_ex)) <= 120 < len(full.prompt_items(long_ex))


def test_class_weights_and_shots():
    from sklearn.utils.class_weight import compute_class_weight

    rows = [dict(dialogue_id="a", turn=i, speaker="x", text="one two three four", label=lab) for i, lab in enumerate(["neutral"] * 6 + ["joy"] * 2 + ["fear"])]
    ds = [Dialogue("a", rows, [{} for _ in rows])]
    w = class_weights(ds, LABELS)
    y = np.array([r["label"] for r in rows])
    ref = compute_class_weight("balanced", classes=np.array(["fear", "joy", "neutral"]), y=y)
    # n / (k * count) in float64, evaluated in another order than sklearn's: within 2 ulp, far inside rel=1e-6
    assert w["fear"] == pytest.approx(ref[0]) and w["neutral"] == pytest.approx(ref[2]) and w["anger"] == 1.0
    shots = sample_shots(ds, 7, 0, LABELS)
    assert len(shots) == 7 and {lab for _, lab in shots} == {"neutral", "joy", "fear"}
    assert sample_shots(ds, 3, 0, LABELS) == sample_shots(ds, 3, 0, LABELS)


def test_reasoning_tokens_are_trained_and_generated(model_tok):
    model, tok = model_tok
    d = dialogue(2, feats=False)
    d.rows[1]["explanation"] = "they sound happy"
    col = Collator(tok, LABELS, reasoning_weight=0.5)
    batch = col([build_example(d, 1, PromptConfig(reasoning=True), LABELS, [])], train=True)
    n_label = len(col.label_tokens[LABELS.index(d.rows[1]["label"])])
    sel = batch["labels"][0] != -100
    assert int(sel.sum()) > n_label
    # 0.5 spread over the explanation tokens in float32: the sum of n rounded shares is within n * 2**-24 of 0.5
    assert float(batch["loss_weights"][0][sel][n_label:].sum()) == pytest.approx(0.5)
    gen = generate_explanation(model, col([build_example(d, 1, PromptConfig(), LABELS, [])]), col.label_tokens[1], tok.eos_token_id, max_new_tokens=5)
    assert 0 <= len(gen) <= 5


def test_artifacts_round_trip_without_ray(model_tok, tmp_path):
    import mer_ray.mllm.predict as mp

    model, tok = model_tok
    cfg = ModelConfig(base=str(model.causal.name_or_path), projectors=PROJ)
    meta = {"labels": list(LABELS), "label_set": "meld7", "model": cfg.model_dump(), "prompt": PromptConfig().model_dump(), "shots": [["wow", "joy"]],
            "template_version": "farcer-v1", "base_model": cfg.base}
    save_artifacts(tmp_path / "art", model.state_dict(), model, meta)
    assert (tmp_path / "art" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "art" / "projectors.safetensors").exists()
    loaded, _, meta2 = load_artifacts(tmp_path / "art")
    assert meta2["labels"] == list(LABELS)
    col = Collator(tok, LABELS)
    batch = col([build_example(dialogue(), i, PromptConfig(), LABELS, [("wow", "joy")]) for i in range(4)])
    # the same modules and the same weights (safetensors round trip is exact) on the same batch: identical
    assert torch.equal(score_labels(loaded, batch, col.label_tokens), score_labels(model, batch, col.label_tokens))
    pred = mp.MLLMPredictor.from_dir(tmp_path / "art")
    out = pred.predict_dialogue([{"speaker": "A", "text": "hi there"}, {"speaker": "B", "text": "oh no, that is awful"}],
                                features=[{"visual": np.ones(128, np.float32)}, {"audio": None}])
    assert out["emotion_probs"].shape == (2, 7)
    # float32 softmax over 7 labels: every row sums to 1 within ~10 * 2**-24 < 1e-6
    np.testing.assert_allclose(out["emotion_probs"].sum(1), 1.0, rtol=1e-5)
    pred.prompt = PromptConfig(past_labels=True)
    seq = pred.predict([dialogue()], progress=False)
    assert len(seq) == 4 and all(abs(float(p.sum()) - 1) < 1e-5 for p in seq.values())  # as above


def test_llama_family_has_no_scale_and_trains(tmp_path):
    from mer_ray.mllm.tiny import build_tiny_lm

    torch.manual_seed(0)
    model, tok = build_mllm(ModelConfig(base=str(build_tiny_lm(tmp_path / "llama", "llama")), projectors={"audio": PROJ["audio"]}))
    assert float(model.projectors["audio"].embed_scale) == 1.0
    batch = Collator(tok, LABELS)([build_example(dialogue(), 3, PromptConfig(), LABELS, [])], train=True)
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.projectors["audio"].net.weight.grad.abs().sum() > 0
