"""transformers backend: a local model directory, or a GGUF via ``gguf_file=``.

Each prompt gives one sequence for its single-token labels, and one sequence
``prompt + label[:-1]`` per multi-token label; the sequences run in right-padded
batches (positions are unchanged by right padding, and causal attention never
sees the pads), and a label's score is the sum of its tokens' log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mer_ray.llm.base import LabelScores, label_continuations, normalise


class TransformersScorer:
    """Label scorer over a Hugging Face causal LM.

    Args:
        model: local directory (config, weights, tokenizer).
        gguf_file: a GGUF file name inside ``model`` to load instead of safetensors.
        batch_size: sequences per padded forward pass.
        n_threads: torch CPU threads (``None``: leave torch's setting).
        max_length: prompts longer than this fail with a ``context overflow`` error.
    """

    def __init__(self, model: str | Path, gguf_file: str | None = None, batch_size: int = 8,
                 n_threads: int | None = None, max_length: int | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if n_threads:
            torch.set_num_threads(n_threads)
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        self.tok = AutoTokenizer.from_pretrained(str(model), **kw)
        self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, **kw).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", 4096)
        self.name = f"transformers:{Path(model).name}{'/' + gguf_file if gguf_file else ''}"
        self.bos_token = self.tok.bos_token or ""
        self.eos_token = self.tok.eos_token or ""

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tok, "chat_template", None)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        if add_bos and self.bos_token and text.startswith(self.bos_token):
            add_bos = False
        return self.tok(text, add_special_tokens=add_bos)["input_ids"]

    def score(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelScores]:
        import torch

        seqs: list[tuple[int, list[int], int, list[tuple[int, list[int]]]]] = []  # (prompt idx, ids, n_prompt, [(label, toks)])
        results: list[LabelScores | None] = [None] * len(prompts)
        lab_toks: list[list[list[int]]] = []
        for i, p in enumerate(prompts):
            ptoks = self.tokenize(p)
            lt = label_continuations(self.tokenize, p, labels)
            lab_toks.append(lt)
            if len(ptoks) + max(map(len, lt)) > self.max_length:
                results[i] = LabelScores(None, n_prompt_tokens=len(ptoks),
                                         error=f"context overflow: {len(ptoks)} tokens > {self.max_length}")
                continue
            seqs.append((i, ptoks, len(ptoks), [(j, t) for j, t in enumerate(lt) if len(t) == 1]))
            for j, t in enumerate(lt):
                if len(t) > 1:
                    seqs.append((i, ptoks + t[:-1], len(ptoks), [(j, t)]))
        logp = {i: np.full(len(labels), -np.inf) for i in range(len(prompts)) if results[i] is None}
        n_eval = dict.fromkeys(logp, 0)
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][1]))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for b in range(0, len(order), self.batch_size):
            batch = [seqs[k] for k in order[b:b + self.batch_size]]
            width = max(len(s[1]) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, :len(s[1])] = torch.as_tensor(s[1])
                mask[r, :len(s[1])] = 1
            with torch.no_grad():
                lsm = torch.log_softmax(self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float(), -1).cpu()
            for r, (i, seq, n_p, labs) in enumerate(batch):
                n_eval[i] += len(seq)
                for j, t in labs:  # token t[k] is predicted at position n_p - 1 + k
                    logp[i][j] = float(sum(lsm[r, n_p - 1 + k, tk] for k, tk in enumerate(t)))
        for i, lp in logp.items():
            results[i] = LabelScores(normalise(lp), lp, len(self.tokenize(prompts[i])), n_eval[i], 0,
                                     label_tokens=lab_toks[i])
        return results
