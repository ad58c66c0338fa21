"""llama.cpp backend (llama-cpp-python): exact label scores with shared-prefix KV reuse.

Each prompt is tokenised; the longest common prefix with what the KV cache
already holds is kept (``llm.n_tokens = L`` rewinds, ``Llama.eval`` drops the
rest of the cache), and only the new suffix is evaluated. Feeding prompts in
sorted order therefore evaluates each node of the prompts' prefix trie once.
Labels are scored from the last position's logits
(``llm._ctx.get_logits_ith(-1)``, ``logits_all=False``); a multi-token label
evaluates its own tokens one by one, then the cache is rewound to the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mer_ray.llm.base import LabelScores, LabelTrie, label_continuations, normalise


def gguf_prompt_format(model: str | Path) -> tuple[str | None, str, str]:
    """(chat template or None, BOS text, EOS text) of a GGUF (path or embedded name), reading its vocabulary only."""
    from llama_cpp import Llama

    from mer_ray.assets import gguf_path

    llm = Llama(model_path=str(gguf_path(str(model))), vocab_only=True, verbose=False)

    def text(i: int) -> str:
        return llm.detokenize([i], special=True).decode("utf-8", "ignore") if i >= 0 else ""

    return llm.metadata.get("tokenizer.chat_template"), text(llm.token_bos()), text(llm.token_eos())


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaCppScorer:
    """Label scorer over a GGUF model.

    Args:
        model: a GGUF path or an embedded name (``gemma3-270m``, ``smollm2-135m-instruct``).
        n_ctx: context length; longer prompts fail with a ``context overflow`` error.
        n_threads: CPU threads for evaluation.
        n_batch: llama.cpp batch size (tokens per decode call).
        reuse_prefix: keep the KV cache of the longest shared prefix between prompts.
        swa_full: full-size sliding-window cache (Gemma 3); required to rewind exactly.
        align: round the reused prefix down to a multiple of this many tokens (see ``score_one``).
    """

    def __init__(self, model: str | Path = "gemma3-270m", n_ctx: int = 4096, n_threads: int = 2,
                 n_batch: int = 512, reuse_prefix: bool = True, swa_full: bool = True, align: int = 8,
                 seed: int = 0):
        from llama_cpp import Llama

        from mer_ray.assets import gguf_path

        self.path = gguf_path(str(model))
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads,
                         n_threads_batch=n_threads, n_batch=n_batch, logits_all=False,
                         swa_full=swa_full, seed=seed, verbose=False)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.reuse_prefix = reuse_prefix
        self.align = max(1, align)
        self.name = f"llama.cpp:{self.path.name}"
        self._n_vocab = self.llm.n_vocab()
        self._bos = self.llm.detokenize([self.llm.token_bos()], special=True).decode("utf-8", "ignore") \
            if self.llm.token_bos() >= 0 else ""
        self._label_cache: dict[tuple[str, tuple[str, ...]], list[list[int]]] = {}

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    @property
    def bos_token(self) -> str:
        return self._bos

    @property
    def eos_token(self) -> str:
        eos = self.llm.token_eos()
        return self.llm.detokenize([eos], special=True).decode("utf-8", "ignore") if eos >= 0 else ""

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids; special tokens in the text (chat markers) parse as such; no double BOS."""
        if add_bos and self._bos and text.startswith(self._bos):
            add_bos = False
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _labels_after(self, prompt: str, labels: Sequence[str]) -> list[list[int]]:
        # The split of a label depends only on the prompt's last characters (the template's tail).
        key = (prompt[-64:], tuple(labels))
        if key not in self._label_cache:
            self._label_cache[key] = label_continuations(self.tokenize, prompt, labels)
        return self._label_cache[key]

    def _last_logprobs(self) -> np.ndarray:
        """Log-softmax of the last position's logits, ``[V]`` float32.

        llama-cpp-python's own ``Llama.logits_to_logprobs``: its server reports exactly these
        values, so the ``ray_data_http`` backend's scores equal this scorer's bit for bit (a float64
        log-softmax differed by float32 rounding, ~2e-7). Each token's log-prob is then summed in
        float64."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return self.llm.logits_to_logprobs(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy())

    def _score_trie(self, node: dict, lp: np.ndarray, acc: float, out: np.ndarray) -> int:
        """Walk the label trie from the current cache position; returns tokens evaluated."""
        n_eval = 0
        for tok, child in LabelTrie.children(node):
            total = acc + float(lp[tok])
            for i in child.get(None, []):
                out[i] = total
            if LabelTrie.children(child):
                here = self.llm.n_tokens
                self.llm.eval([tok])
                n_eval += 1 + self._score_trie(child, self._last_logprobs(), total, out)
                self.llm.n_tokens = here  # rewind to the parent; eval() drops the rest
        return n_eval

    def score_one(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        toks = self.tokenize(prompt)
        lab_toks = self._labels_after(prompt, labels)
        need = len(toks) + max(len(t) for t in lab_toks)
        if need > self.n_ctx:
            return LabelScores(None, n_prompt_tokens=len(toks), error=f"context overflow: {need} tokens > n_ctx {self.n_ctx}")
        keep = 0
        if self.reuse_prefix:
            cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
            keep = min(_lcp(cached, toks), len(toks) - 1)  # evaluate >= 1 token to get fresh logits
            # CPU matmul kernels tile rows; cutting on a tile boundary keeps every kept row's
            # numerics those of a fresh evaluation, so reuse gives bit-identical logits.
            keep -= keep % self.align
        else:
            self.llm.reset()
        if keep and not self.llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0  # this cache cannot be cut at ``keep`` (e.g. a small SWA cache): start over
            self.llm.reset()
        self.llm.n_tokens = keep
        # Evaluate in the chunks a fresh evaluation uses ([0, n_batch), [n_batch, 2 n_batch), ...):
        # a suffix crossing a chunk boundary in one call changed the logits (by up to 0.09 in
        # probability on the benchmark's 515-519-token prompts); split there, they match.
        nb, a = self.llm.n_batch, keep
        while a < len(toks):
            b = min(len(toks), (a // nb + 1) * nb)
            self.llm.eval(toks[a:b])
            a = b
        logprobs = np.full(len(labels), -np.inf)
        n_label = self._score_trie(LabelTrie(lab_toks).root, self._last_logprobs(), 0.0, logprobs)
        self.llm.n_tokens = len(toks)
        return LabelScores(normalise(logprobs), logprobs, len(toks), len(toks) - keep + n_label, keep,
                           label_tokens=lab_toks)

    def score(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        out = []
        for p in prompts:
            try:
                out.append(self.score_one(p, labels))
            except Exception as e:  # a backend error fails this prompt, not the batch
                self.llm.reset()
                out.append(LabelScores(None, error=f"backend error: {type(e).__name__}: {e}"))
        return out
