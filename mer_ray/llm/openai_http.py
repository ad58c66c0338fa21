"""OpenAI-compatible completions backend (vLLM, llama.cpp server, ...): exact label scores.

For each (prompt, label) it requests ``prompt + label`` with ``echo=true``,
``logprobs`` and ``max_tokens=1``, and sums the echoed log-probabilities of the
label's own tokens (those that start at or after the prompt's end). It never
reads or renormalises a top-k list, in which labels may be missing. The
server must return prompt log-probabilities (llama.cpp server: ``logits_all``;
vLLM: supports ``echo`` with ``logprobs``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

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
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_workers: int = 4,
                 chat_template_from: str | None = None, timeout: float = 120.0):
        import httpx

        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.max_workers = max_workers
        self.name = f"openai:{model}@{base_url}"
        self._chat = None
        self.bos_token = self.eos_token = ""
        if chat_template_from:
            from mer_ray.llm.backends import prompt_format_for

            self._chat, self.bos_token, self.eos_token = prompt_format_for(
                {"kind": "llama_cpp", "model": chat_template_from})

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
        offsets, token_lps, tokens = lp["text_offset"], lp["token_logprobs"], lp["tokens"]
        end = len(prompt) + len(label)
        # echoed tokens that start inside the label; the generated token starts at or after ``end``
        idx = [i for i, o in enumerate(offsets) if len(prompt) <= o < end]
        if not idx:
            raise RuntimeError(f"no echoed tokens for label {label!r} (offsets end at {offsets[-3:]})")
        vals = [token_lps[i] for i in idx]
        if any(v is None for v in vals):
            raise RuntimeError("the server returned no prompt log-probabilities (echo with logprobs unsupported?)")
        return float(sum(vals)), len(idx), idx[0]

    def _score_one(self, prompt: str, labels: Sequence[str]) -> LabelScores:
        try:
            res = [self.label_logprob(prompt, lab) for lab in labels]
        except Exception as e:
            return LabelScores(None, error=f"backend error: {type(e).__name__}: {e}")
        lps = np.array([r[0] for r in res])
        n_prompt = res[0][2]
        return LabelScores(normalise(lps), lps, n_prompt, n_prompt + sum(r[1] for r in res), 0)

    def score(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        with ThreadPoolExecutor(self.max_workers) as ex:
            return list(ex.map(lambda p: self._score_one(p, labels), prompts))
