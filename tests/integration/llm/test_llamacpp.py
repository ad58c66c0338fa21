"""llama.cpp backend on the packaged SmolLM2: exact multi-token labels, exact prefix reuse, failures."""

from __future__ import annotations

import numpy as np
import pytest

from mer_ray.llm.prompts import apply_chat_template

pytestmark = pytest.mark.slow
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


@pytest.fixture(scope="module")
def scorer():
    from mer_ray.llm.llamacpp import LlamaCppScorer

    return LlamaCppScorer("smollm2-135m-instruct", n_ctx=1024, n_threads=1)


def _prompts(sc):
    head = "Conversation:\n[1] Ross: \"We were on a break!\"\n[2] Rachel: \"I can't believe you.\"\n"
    users = [head + f"Which emotion does the speaker express in utterance [{i}]? Answer with one word from: "
             + ", ".join(LABELS) + "." for i in (1, 2)]
    return [apply_chat_template(sc.chat_template, [{"role": "user", "content": u}], sc.bos_token, sc.eos_token)
            for u in users]


def test_labels_are_scored_exactly_where_they_follow_the_chat_template(scorer):
    """The scorer's label log-probs equal, bit for bit, a reference that evaluates the same token
    batches with the same context parameters: llama.cpp's CPU kernels give slightly different
    logits for different batch shapes (by an amount that depends on the CPU), so the reference
    never uses ``logits_all=True`` or a different chunking; it re-evaluates the prompt for every
    label (no cache rewinding), feeds each label token alone as the scorer's trie does, and reads
    the logits through ``llama_get_logits`` instead of the scorer's ``get_logits_ith(-1)``."""
    import llama_cpp
    from llama_cpp import Llama

    prompts = _prompts(scorer)
    assert prompts[0].endswith("<|im_start|>assistant\n")
    scorer.llm.reset()  # prompt 0 from an empty cache: no reused prefix, as in the reference
    out = scorer.score(prompts, LABELS)
    assert out[0].tokens_reused == 0
    lens = [len(t) for t in out[0].label_tokens]
    assert max(lens) > 1  # after the newline some labels split: first-token scoring would be wrong
    p, r = prompts[0], out[0]
    ptoks = scorer.tokenize(p)
    n = len(ptoks)
    assert n < scorer.llm.n_batch  # one prompt chunk in both (Llama.eval chunks by n_batch from 0, as the scorer)
    # the scorer's construction parameters (mer_ray/llm/llamacpp.py), so the same kernels run
    ref = Llama(model_path=str(scorer.path), n_ctx=scorer.llm.n_ctx(), n_threads=scorer.n_threads,
                n_threads_batch=scorer.n_threads, n_batch=scorer.llm.n_batch, logits_all=False,
                swa_full=True, seed=0, verbose=False)
    n_vocab = ref.n_vocab()
    for j, lab in enumerate(LABELS):
        ref.reset()
        ref.eval(ptoks)  # a fresh evaluation of the prompt
        total = 0.0
        for k, tok in enumerate(r.label_tokens[j]):
            if k:
                ref.eval([r.label_tokens[j][k - 1]])  # one token per decode, as the scorer's label trie
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ref.ctx), shape=(n_vocab,)).copy()
            total += float(Llama.logits_to_logprobs(logits)[tok])  # summed in float64, in token order as the scorer
        assert ref.n_tokens == n + len(r.label_tokens[j]) - 1
        assert r.logprobs[j] == total, lab  # identical computation: bit equality
    for r in out:
        # probs = exp(z)/sum(exp(z)) in float64 over 7 labels: 7 rounded quotients and two 7-term sums,
        # so |sum - 1| <= ~20 * 2**-53 on any CPU; 1e-12 is far above that
        assert abs(r.probs.sum() - 1.0) <= 1e-12


def test_prefix_reuse_is_exact_and_counted(scorer):
    prompts = _prompts(scorer)
    scorer.reuse_prefix = False
    naive = scorer.score(prompts, LABELS)
    scorer.reuse_prefix = True
    scorer.llm.reset()
    reused = scorer.score(prompts, LABELS)
    assert reused[1].tokens_reused > 20 and naive[1].tokens_reused == 0
    assert reused[1].tokens_evaluated < naive[1].tokens_evaluated
    for a, b in zip(naive, reused):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_context_overflow_is_a_recorded_failure(scorer):
    long = "word " * 1500
    out = scorer.score([long, _prompts(scorer)[0]], LABELS)
    assert out[0].error.startswith("context overflow") and out[0].probs is None
    assert out[1].ok


def test_reuse_across_a_batch_boundary_matches_a_fresh_evaluation():
    """A reused prefix, then a suffix ending a few tokens past n_batch: a fresh evaluation
    computes those last rows as a small chunk of their own, so the scorer must too (evaluated in
    one call, Gemma's probabilities moved by up to 0.09 on the benchmark's prompts)."""
    from mer_ray.llm.llamacpp import LlamaCppScorer

    nb = 512
    sc = LlamaCppScorer("gemma3-270m", n_ctx=1024, n_threads=2, n_batch=nb)
    head = "Conversation:\n" + "".join(f"[{i}] Ross: \"line number {i} of a long quarrel\"\n" for i in range(1, 29))
    words = "and I do not care any more about any of this at all you hear me Ross".split()
    tails = []
    for n_words in range(1, len(words) + 1):  # prompts ending 1-7 tokens past the chunk boundary
        p = head + "[3] Rachel: \"" + " ".join(words[:n_words]) + "\"\nWhich emotion is it?"
        if nb < len(sc.tokenize(p)) <= nb + 7:
            tails.append(p)
    assert tails
    prompts = [head + "[3] Monica: \"Stop it.\"\nWhich emotion is it?"] + tails
    reused = sc.score(prompts, LABELS)
    assert all(0 < r.tokens_reused < nb for r in reused[1:])
    sc.reuse_prefix = False
    fresh = sc.score(prompts, LABELS)
    for a, b in zip(reused, fresh):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
