"""OpenAI-compatible completions backend (vLLM, llama.cpp server, ...): exact label scores.

Two exact modes; neither reads nor renormalises a top-k list (labels may be missing there):

- ``echo`` (vLLM and other servers that follow the OpenAI semantics): request
  ``prompt + label`` with ``echo=true``, ``logprobs`` and ``max_tokens=1``, and sum the
  echoed log-probabilities of the label's own tokens (those starting at or after the
  prompt's end).
- ``forced`` (llama-cpp-python's ``llama_cpp.server``, whose echoed prompt log-probs are
  off by one position: token ``i`` is paired with the distribution that predicts token
  ``i+1``): per label token ``t_k``, request ``prompt + t_1..t_{k-1}`` with
  ``max_tokens=1``, ``logprobs=1`` and ``logit_bias={t_k: +100}``; the generated token is
  ``t_k`` and its reported log-prob comes from the unbiased logits, i.e.
  ``log p(t_k | prompt, t_<k)``. Label tokens come from the server's ``/extras/tokenize``,
  where the label actually follows the prompt. The server needs ``--logits_all true``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mer_ray.llm.base import LabelScores, normalise


class OpenAICompletionsScorer:
    """Label scorer over ``POST {base_url}/completions``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name.
        api_key: bearer token, if the server wants one.
        max_workers: concurrent requests.
        chat_template_from: GGUF path/name whose chat template wraps prompts (``None``: raw prompts).
        timeout: seconds per request.
        mode: ``echo`` or ``forced`` (see the module docstring).
        client: an ``httpx.Client`` to use instead of a new one.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_workers: int = 4,
                 chat_template_from: str | None = None, timeout: float = 120.0, mode: str = "echo",
                 client=None):
        import httpx

        if mode not in ("echo", "forced"):
            raise ValueError(f"mode must be 'echo' or 'forced', got {mode!r}")
        self.mode = mode
        self.base = base_url.rstrip("/")
        self.url = self.base + "/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout, headers=headers)
        self.max_workers = max_workers
        self.name = f"openai:{model}@{base_url}"
        self._chat = None
        self.bos_token = self.eos_token = ""
        if chat_template_from:
            from mer_ray.llm.llamacpp import gguf_prompt_format

            self._chat, self.bos_token, self.eos_token = gguf_prompt_format(chat_template_from)

    @property
    def chat_template(self) -> str | None:
        return self._chat

    def label_logprob(self, prompt: str, label: str) -> tuple[float, int, int]:
        """(sum of the label tokens' log-probs, number of label tokens, prompt tokens)."""
        r = self.client.post(self.url, json={"model": self.model, "prompt": prompt + label, "max_tokens": 1,
                                             "echo": True, "logprobs": 1, "temperature": 0.0})
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        lp = r.json()["choices"][0]["logprobs"]
        offsets, token_lps = lp["text_offset"], lp["token_logprobs"]
        end = len(prompt) + len(label)
        # echoed tokens that start inside the label; the generated token starts at or after ``end``
        idx = [i for i, o in enumerate(offsets) if len(prompt) <= o < end]
        if not idx:
            raise RuntimeError(f"no echoed tokens for label {label!r} (offsets end at {offsets[-3:]})")
        vals = [token_lps[i] for i in idx]
        if any(v is None for v in vals):
            raise RuntimeError("the server returned no prompt log-probabilities (echo with logprobs unsupported?)")
        return float(sum(vals)), len(idx), idx[0]

    def _post(self, path: str, body: dict) -> dict:
        r = self.client.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code} from {path}: {r.text[:300]}")
        return r.json()

    def _tokenize(self, text: str) -> list[int]:
        root = self.base[:-3] if self.base.endswith("/v1") else self.base
        return self._post(root + "/extras/tokenize", {"input": text})["tokens"]

    def forced_label_logprob(self, prompt: str, label: str) -> tuple[float, int, int]:
        """``forced`` mode: (sum of the label tokens' log-probs, label tokens, prompt tokens)."""
        root = self.base[:-3] if self.base.endswith("/v1") else self.base
        base, full = self._tokenize(prompt), self._tokenize(prompt + label)
        if full[: len(base)] != base or len(full) <= len(base):
            raise RuntimeError(f"label {label!r} merges with the prompt's last token; cannot score it exactly")
        total, text = 0.0, prompt
        for k, tok in enumerate(full[len(base):]):
            if k:
                text = prompt + self._post(root + "/extras/detokenize", {"tokens": full[len(base):len(base) + k]})["text"]
            out = self._post(self.url, {"model": self.model, "prompt": text, "max_tokens": 1, "logprobs": 1,
                                        "temperature": 0.0, "logit_bias": {str(tok): 100.0}})
            lp = out["choices"][0]["logprobs"]
            want = self._post(root + "/extras/detokenize", {"tokens": [tok]})["text"]
            if lp["tokens"][0] != want:
                raise RuntimeError(f"forced token {want!r} but the server generated {lp['tokens'][0]!r}")
            total += float(lp["token_logprobs"][0])
        return total, len(full) - len(base), len(base)

    def _score_one(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        fn = self.label_logprob if self.mode == "echo" else self.forced_label_logprob
        try:
            res = [fn(prompt, lab) for lab in labels]
        except Exception as e:
            return LabelScores(None, error=f"backend error: {type(e).__name__}: {e}")
        lps = np.array([r[0] for r in res])
        n_prompt = res[0][2]
        return LabelScores(normalise(lps), lps, n_prompt, n_prompt + sum(r[1] for r in res), 0)

    def score(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        with ThreadPoolExecutor(self.max_workers) as ex:
            return list(ex.map(lambda p: self._score_one(p, labels), prompts))
