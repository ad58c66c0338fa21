"""Label distributions from a fine-tuned (or untrained) multimodal LLM, without Ray or DeepSpeed.

:class:`MLLMPredictor` rebuilds the training prompts from the artifact JSON
(template, shots, context) and scores the label set exactly
(:func:`~mer_ray.mllm.model.score_labels`). With past labels, a dialogue is
predicted turn by turn and each prediction is written into the later prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mer_ray.mllm.dialogue import DIALOGUE_TEMPLATE, DialogueEncoder
from mer_ray.mllm.examples import Collator, Dialogue, Key, PromptConfig, build_example
from mer_ray.mllm.model import MultimodalLM, score_labels


class MLLMPredictor:
    """Per-utterance emotion distributions.

    Args:
        model: the multimodal LM (eval mode).
        tokenizer: its tokenizer.
        labels: label set, in order (the columns of every distribution).
        prompt: prompt settings used in training.
        shots: the few-shot (text, label) examples used in training.
        batch_size: prompts per forward pass.
    """

    def __init__(self, model: MultimodalLM, tokenizer, labels: tuple[str, ...], prompt: PromptConfig,
                 shots: list[tuple[str, str]], batch_size: int = 4, label_set: str = ""):
        self.model, self.labels, self.prompt, self.shots = model.eval(), tuple(labels), prompt, [tuple(s) for s in shots]
        self.collate = Collator(tokenizer, self.labels, None, prompt.max_tokens)
        self.encoder = None
        if prompt.template == DIALOGUE_TEMPLATE:
            self.encoder = DialogueEncoder(tokenizer, self.labels, prompt)
        self.batch_size, self.label_set = batch_size, label_set
        self.modalities = list(model.projectors.keys())

    @classmethod
    def from_dir(cls, art_dir: str | Path, base: str | None = None, batch_size: int = 4) -> MLLMPredictor:
        """Load ``adapter/``, ``projectors.safetensors`` and ``mer_mllm.json`` from ``art_dir``."""
        from mer_ray.mllm.artifacts import load_artifacts

        model, tok, meta = load_artifacts(art_dir, base)
        return cls(model, tok, tuple(meta["labels"]), PromptConfig(**meta["prompt"]), meta["shots"], batch_size, meta["label_set"])

    @classmethod
    def from_base(cls, base: str, label_set: str, prompt: PromptConfig, shots, batch_size: int = 4, lm=None, tokenizer=None) -> MLLMPredictor:
        """The untrained baseline: the base LLM, no projector, no LoRA, the same prompts and scoring."""
        from mer_ray.data.labels import get_label_set
        from mer_ray.mllm.build import ModelConfig, build_mllm

        model, tok = build_mllm(ModelConfig(base=base, label_set=label_set, lora=None), lm, tokenizer)
        return cls(model, tok, get_label_set(label_set).labels, prompt, shots, batch_size, label_set)

    def _score(self, examples: list) -> np.ndarray:
        dev = next(self.model.parameters()).device
        batch = {k: v.to(dev) for k, v in self.collate(examples).items()}
        return score_labels(self.model, batch, self.collate.label_tokens).float().cpu().numpy()

    def _predict_dialogues(self, dialogues: list[Dialogue], keys: set[Key] | None, refs: dict[Key, np.ndarray] | None,
                           progress: bool) -> dict[Key, np.ndarray]:
        """Template ``farcer-dialogue-v1``: one pass per segment, every utterance read at its marker."""
        from mer_ray.mllm.model import score_markers

        segs = [s for d in dialogues for s in self.encoder.segments(d, refs) if keys is None or any(k in keys for k in s.keys)]
        segs.sort(key=lambda s: len(s.items))  # similar lengths per batch: little padding
        dev = next(self.model.parameters()).device
        out: dict[Key, np.ndarray] = {}
        bar = tqdm(total=sum(len(s.keys) for s in segs), desc="scoring dialogues", disable=not progress)
        for i in range(0, len(segs), self.batch_size):
            chunk = segs[i : i + self.batch_size]
            batch = {k: v.to(dev) for k, v in self.encoder(chunk).items()}
            probs = score_markers(self.model, batch).float().cpu().numpy()
            for key, p in zip([k for s in chunk for k in s.keys], probs):
                if keys is None or key in keys:
                    out[key] = p
            bar.update(sum(len(s.keys) for s in chunk))
        return out

    def predict(self, dialogues: list[Dialogue], keys: set[Key] | None = None, progress: bool = True,
                references: dict[Key, np.ndarray] | None = None) -> dict[Key, np.ndarray]:
        """``{(dialogue_id, turn): [C] probabilities}`` for ``keys`` (default: every utterance).

        With past labels every earlier turn of a wanted utterance is predicted too (its label enters the prompt).

        Args:
            references: vanilla distributions per utterance, for a model trained with ``prompt.references``.
        """
        if self.encoder is not None:
            return self._predict_dialogues(dialogues, keys, references, progress)
        want = [(d, i) for d in dialogues for i, r in enumerate(d.rows) if keys is None or (d.dialogue_id, int(r["turn"])) in keys]
        out: dict[Key, np.ndarray] = {}
        bar = tqdm(total=len(want), desc="scoring labels", disable=not progress)
        if not self.prompt.past_labels:
            todo = sorted(want, key=lambda di: len(di[0].rows[di[1]]["text"]))
            for s in range(0, len(todo), self.batch_size):
                chunk = todo[s : s + self.batch_size]
                probs = self._score([build_example(d, i, self.prompt, self.labels, self.shots) for d, i in chunk])
                for (d, i), p in zip(chunk, probs):
                    out[(d.dialogue_id, int(d.rows[i]["turn"]))] = p
                bar.update(len(chunk))
            return out
        last = {d.dialogue_id: max(i for dd, i in want if dd is d) for d in {id(d): d for d, _ in want}.values()}
        past = {d.dialogue_id: [None] * len(d.rows) for d in dialogues}
        active = [d for d in dialogues if d.dialogue_id in last]
        for pos in range(max(last.values(), default=-1) + 1):
            step = [d for d in active if pos <= last[d.dialogue_id]]
            for s in range(0, len(step), self.batch_size):
                chunk = step[s : s + self.batch_size]
                probs = self._score([build_example(d, pos, self.prompt, self.labels, self.shots, past[d.dialogue_id]) for d in chunk])
                for d, p in zip(chunk, probs):
                    past[d.dialogue_id][pos] = self.labels[int(p.argmax())]
                    key = (d.dialogue_id, int(d.rows[pos]["turn"]))
                    if keys is None or key in keys:
                        out[key] = p
                        bar.update(1)
        return out

    def predict_dialogue(self, utterances: list[dict], features: list[dict] | None = None,
                         references: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One dialogue (dicts with ``speaker``, ``text``; ``turn`` optional) -> ``{"emotion_probs": [n, C]}``.

        Args:
            features: per utterance, modality -> vector (missing entries are left out of the prompt).
        """
        rows = [{"dialogue_id": "d", "turn": u.get("turn", i), "speaker": u.get("speaker", "Speaker"), "text": u["text"]} for i, u in enumerate(utterances)]
        d = Dialogue("d", rows, [{m: np.asarray(v, np.float32) for m, v in f.items() if v is not None} for f in features] if features else [{} for _ in rows])
        refs = None if references is None else {("d", int(r["turn"])): np.asarray(p) for r, p in zip(rows, references)}
        probs = self.predict([d], progress=False, references=refs)
        return {"emotion_probs": np.stack([probs[("d", int(r["turn"]))] for r in rows])}


def evaluate(probs: dict[Key, np.ndarray], dialogues: list[Dialogue], labels: tuple[str, ...]) -> dict:
    """Metrics (percent) of argmax predictions against gold, over the keys in ``probs``."""
    from mer_ray.eval.metrics import compute_metrics

    gold = {(d.dialogue_id, int(r["turn"])): r["label"] for d in dialogues for r in d.rows}
    keys = sorted(probs)
    return compute_metrics([gold[k] for k in keys], [labels[int(probs[k].argmax())] for k in keys], labels)


@torch.no_grad()
def predict_table(pred: MLLMPredictor, dialogues: list[Dialogue], split: str, keys: set[Key] | None = None,
                  references: dict[Key, np.ndarray] | None = None):
    """A prediction table (vanilla's contract: no gold columns; label order in metadata ``emotion_labels``)."""
    import json

    import pyarrow as pa

    probs = pred.predict(dialogues, keys, references=references)
    rows = [{"dialogue_id": d.dialogue_id, "turn": int(r["turn"]), "speaker": r["speaker"], "text": r["text"], "split": split,
             "emotion_probs": [float(x) for x in probs[(d.dialogue_id, int(r["turn"]))]],
             "emotion_pred": pred.labels[int(probs[(d.dialogue_id, int(r["turn"]))].argmax())]}
            for d in dialogues for r in d.rows if (d.dialogue_id, int(r["turn"])) in probs]
    schema = pa.schema([("dialogue_id", pa.string()), ("turn", pa.int64()), ("speaker", pa.string()), ("text", pa.string()),
                        ("split", pa.string()), ("emotion_probs", pa.list_(pa.float32())), ("emotion_pred", pa.string())],
                       metadata={"emotion_labels": json.dumps(list(pred.labels)), "label_set": pred.label_set})
    return pa.Table.from_pylist(rows, schema=schema)
