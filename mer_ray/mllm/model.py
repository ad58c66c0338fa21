"""A causal LM with modality projectors: FARCER / Emotion-LLaMA interleaving, loss and exact label scoring.

Plain PyTorch + transformers + peft (no Ray, no DeepSpeed). The model sees one
batch dict of tensors (built by :mod:`mer_ray.mllm.examples`):

- ``input_ids`` ``[B, T]`` long: text tokens; positions that carry a modality
  vector hold the pad id and are overwritten by the projected feature;
- ``attention_mask`` ``[B, T]``: 1 for real positions (right padding);
- ``feat_<m>`` ``[N_m, D_m]`` and ``pos_<m>`` ``[N_m, 2]`` (batch row, position)
  for each modality ``m`` present in the batch: only utterances that have the
  feature get a slot, so a missing modality is left out, never zero-filled;
- ``labels`` ``[B, T]`` long (-100 = no loss) and ``loss_weights`` ``[B, T]``
  for training: the label's sub-word tokens (and explanation tokens);
- ``score_pos`` ``[B]`` long: the last prompt position, whose next-token
  distribution scores the label set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mer_ray.mllm.projector import Projector


class MultimodalLM(nn.Module):
    """An LLM (optionally with LoRA) plus one projector per non-text modality.

    Args:
        lm: a transformers causal LM, or a peft model wrapping one.
        projectors: modality name -> :class:`Projector` (may be empty: text only).
    """

    def __init__(self, lm: nn.Module, projectors: nn.ModuleDict):
        super().__init__()
        self.lm = lm
        self.projectors = projectors
        causal = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self.softcap = getattr(causal.config, "final_logit_softcapping", None)

    @property
    def causal(self) -> nn.Module:
        """The transformers causal LM (inside peft, if any)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text embeddings with the projected modality vectors put in their slots.

        Returns:
            ``[B, T, H]`` input embeddings, on the model's embedding scale.
        """
        emb = self.causal.get_input_embeddings()(batch["input_ids"])
        for name, proj in self.projectors.items():
            pos = batch.get(f"pos_{name}")
            if pos is None or pos.numel() == 0:
                continue
            vec = proj(batch[f"feat_{name}"]).to(emb.dtype)
            emb = emb.index_put((pos[:, 0], pos[:, 1]), vec)  # out of place: autograd reaches the projector
        return emb

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the decoder's last norm)."""
        out = self.causal.get_decoder()(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"], use_cache=False)
        return out.last_hidden_state

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[..., V]`` through the LM head (and Gemma-2-style soft-capping, if any).

        Computing logits only where needed keeps memory small: Gemma's
        vocabulary has 262k entries.
        """
        logits = self.causal.get_output_embeddings()(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def label_logits(self, h: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[N, K]``: the LM head's logits of the ``K`` label tokens only.

        Equal to ``logits_from_hidden(h)[:, label_ids]`` (soft-capping is element-wise) at a fraction of the
        cost: 7 rows of the head instead of 262k.
        """
        head = self.causal.get_output_embeddings()
        logits = (h @ head.weight[label_ids].T).float()
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[label_ids].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss for one batch (a scalar): :func:`marker_loss` for dialogue batches (``marker_pos``),
        else :func:`weighted_label_loss`."""
        return marker_loss(self, batch) if "marker_pos" in batch else weighted_label_loss(self, batch)


def marker_loss(model: MultimodalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class-weighted cross-entropy over the label set at every utterance marker (template ``farcer-dialogue-v1``).

    The softmax runs over the ``K`` label tokens only: that is the distribution the model predicts
    (:func:`score_markers`), so training and inference agree. Batch keys: ``marker_pos`` ``[N, 2]``
    (row, position), ``label_ids`` ``[K]``, ``marker_label`` ``[N]`` (index into the label set),
    ``marker_weight`` ``[N]``. Returns ``sum(w * ce) / sum(w)``.
    """
    h = model.hidden(batch)
    pos = batch["marker_pos"]
    logits = model.label_logits(h[pos[:, 0], pos[:, 1]], batch["label_ids"])
    ce = F.cross_entropy(logits, batch["marker_label"], reduction="none")
    w = batch["marker_weight"].to(ce.dtype)
    return (w * ce).sum() / w.sum().clamp_min(1e-8)


@torch.no_grad()
def score_markers(model: MultimodalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, K]`` label distributions at the markers of a dialogue batch (rows sum to 1)."""
    h = model.hidden(batch)
    pos = batch["marker_pos"]
    return model.label_logits(h[pos[:, 0], pos[:, 1]], batch["label_ids"]).softmax(-1)


def weighted_label_loss(model: MultimodalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class-weighted cross-entropy on the label (and explanation) tokens only.

    Token ``t`` with ``labels[b, t] != -100`` is predicted from position
    ``t - 1``. Each label token carries ``w_class / n_subword_tokens`` (set by
    the collator), so a class's weight is spread over its sub-word tokens; the
    result is the weighted mean ``sum(w * ce) / sum(w)``, as in
    ``torch.nn.functional.cross_entropy(weight=...)``.
    """
    h = model.hidden(batch)
    b, t = torch.nonzero(batch["labels"] != -100, as_tuple=True)
    if b.numel() == 0:
        raise ValueError("batch has no label tokens to train on")
    logits = model.logits_from_hidden(h[b, t - 1])
    ce = F.cross_entropy(logits, batch["labels"][b, t], reduction="none")
    w = batch["loss_weights"][b, t].to(ce.dtype)
    return (w * ce).sum() / w.sum().clamp_min(1e-8)


@torch.no_grad()
def score_labels(model: MultimodalLM, batch: dict[str, torch.Tensor], label_tokens: list[list[int]]) -> torch.Tensor:
    """Exact label-set scoring: ``P(label | prompt)`` renormalised over the label set.

    Each label's score is the teacher-forced log-probability of all its tokens.
    When every label is one token (Gemma and SmolLM2 with a leading space) a
    single forward pass reads them at ``score_pos``; otherwise each label is
    appended to every prompt and scored in one batch of ``B * K`` rows.

    Args:
        batch: prompts ending at ``score_pos`` (no label tokens).
        label_tokens: token ids of each of the K labels.

    Returns:
        ``[B, K]`` probabilities (rows sum to 1).
    """
    h = model.hidden(batch)
    rows = torch.arange(h.shape[0], device=h.device)
    last = model.logits_from_hidden(h[rows, batch["score_pos"]]).log_softmax(-1)  # [B, V]
    if all(len(toks) == 1 for toks in label_tokens):
        firsts = torch.tensor([toks[0] for toks in label_tokens], device=h.device)
        return last[:, firsts].softmax(-1)
    emb = model.embed(batch)
    tok_emb = model.causal.get_input_embeddings()
    scores = torch.zeros(h.shape[0], len(label_tokens), device=h.device)
    for k, toks in enumerate(label_tokens):
        scores[:, k] = last[:, toks[0]]
        if len(toks) == 1:
            continue
        ids = torch.tensor(toks, device=h.device)
        for b in range(h.shape[0]):  # prompts differ in length; append right after each one's end
            end = int(batch["score_pos"][b]) + 1
            seq = torch.cat([emb[b, :end], tok_emb(ids[None, :-1])[0]], 0)[None]
            # position end + j predicts label token j + 1 (token 0 was read from the prompt's last position)
            hh = model.causal.get_decoder()(inputs_embeds=seq, use_cache=False).last_hidden_state[0, end:]
            lp = model.logits_from_hidden(hh).log_softmax(-1)
            scores[b, k] += lp[torch.arange(len(toks) - 1, device=h.device), ids[1:]].sum()
    return scores.softmax(-1)


@torch.no_grad()
def generate_explanation(model: MultimodalLM, batch: dict[str, torch.Tensor], label_ids: list[int], eos_id: int, max_new_tokens: int = 32) -> list[int]:
    """Greedy explanation after a label (reasoning head), for one prompt (``B = 1``).

    Args:
        label_ids: tokens of the predicted label, appended after the prompt, then the
            explanation marker tokens.

    Returns:
        generated token ids (without the prompt).
    """
    end = int(batch["score_pos"][0]) + 1
    seq = torch.cat([model.embed(batch)[0, :end], model.causal.get_input_embeddings()(torch.tensor(label_ids))], 0)
    out: list[int] = []
    for _ in range(max_new_tokens):
        h = model.causal.get_decoder()(inputs_embeds=seq[None], use_cache=False).last_hidden_state[0, -1]
        nxt = int(model.logits_from_hidden(h).argmax())
        if nxt == eos_id:
            break
        out.append(nxt)
        seq = torch.cat([seq, model.causal.get_input_embeddings()(torch.tensor([nxt]))], 0)
    return out


__all__ = ["MultimodalLM", "Projector", "weighted_label_loss", "marker_loss", "score_markers", "score_labels", "generate_explanation"]
