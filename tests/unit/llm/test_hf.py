"""transformers backend on a tiny model built from a config (character tokenizer: multi-token labels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"[]()-\n")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _reference(model, tok, prompt, label):
    ids = tok(prompt + label)["input_ids"]
    n = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(lsm[i - 1, ids[i]] for i in range(n, len(ids))))


def test_batched_padded_scores_equal_unbatched_exact_scores(tiny_dir):
    from mer_ray.llm.hf import TransformersScorer

    sc = TransformersScorer(tiny_dir, batch_size=3)
    # Batched, right-padded sequences and the unbatched reference run different matrix shapes, so their
    # float sums round differently. In float64 (u = 2**-53) a 2-layer, 32-wide model's logits (|x| < 16)
    # then agree to ~1e-12; the scorer's .float() rounds both to the same float32 value or to neighbours
    # 1 ulp (<= 2**-20) apart, and float32 log_softmax (2-Lipschitz in max-norm, a few ulp of rounding)
    # keeps each token's log-prob within ~1e-5: a label of <= 8 tokens within 1e-4 on any CPU.
    sc.model.double()
    labels = [" joy", " anger", " sadness"]
    prompts = ["Speaker: hi there. Emotion:", "A much longer prompt, with more text in it. Emotion:", "x:"]
    out = sc.score(prompts, labels)
    assert [len(t) for t in out[0].label_tokens] == [4, 6, 8]  # multi-token labels, scored fully
    for p, r in zip(prompts, out):
        ref = np.array([_reference(sc.model, sc.tok, p, lab) for lab in labels])
        np.testing.assert_allclose(r.logprobs, ref, rtol=0, atol=1e-4)
        # softmax of 3 float64 values: |sum - 1| within ~10 ulp
        assert abs(r.probs.sum() - 1.0) <= 1e-12 and r.ok
    sc.max_length = 20
    over = sc.score(prompts, labels)
    assert over[1].error.startswith("context overflow") and over[2].ok
