"""Evaluate a fine-tuned model and the untrained baseline on fixed stratified seeded subsets (no Ray).

The baseline is the same base LLM with no projector and no LoRA, the same
prompt template and the same exact label scoring; its shot count is chosen on
the first split in ``eval.splits`` (dev) by weighted F1, then reported on the
others (test).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mer_ray.mllm.artifacts import read_meta
from mer_ray.mllm.config import FinetuneConfig
from mer_ray.mllm.examples import load_dialogues, sample_shots, stratified_keys
from mer_ray.mllm.predict import MLLMPredictor, evaluate

KEEP = ("n", "weighted_f1", "accuracy", "macro_f1", "per_class_f1")


def _short(m: dict) -> dict:
    return {k: m[k] for k in KEEP}


def _references(cfg: FinetuneConfig, split: str, labels):
    from mer_ray.mllm.dialogue import read_references

    if split not in cfg.data.references:
        raise ValueError(f"the model reads vanilla references: data.references needs split {split!r}")
    return read_references(cfg.data.references[split], labels)


def run_eval(cfg: FinetuneConfig, art_dir: str | Path | None, out_json: str | Path | None = None, device: str = "cpu") -> dict:
    """Metrics of the fine-tuned model (``art_dir``; None = skip) and of the baseline shot counts, per split (on ``device``)."""
    from mer_ray.data.labels import get_label_set

    labels = get_label_set(cfg.model.label_set).labels
    mods = {m: p.feature for m, p in cfg.model.projectors.items()}
    e = cfg.eval
    data = {}
    for split in e.splits:
        dialogues = load_dialogues(cfg.data.model_copy(update={"max_dialogues": {}}), split, mods)
        keys = stratified_keys(dialogues, e.subset, e.seed) if e.subset else None
        data[split] = (dialogues, keys)
    res: dict = {"splits": e.splits, "subset": e.subset, "subset_seed": e.seed, "base_model": cfg.model.base,
                 "template": cfg.prompt.template, "finetuned": {}, "baseline": {}}
    if art_dir is not None:
        t0 = time.time()
        ft = MLLMPredictor.from_dir(art_dir, batch_size=e.batch_size)
        ft.model.to(device)
        for split, (dialogues, keys) in data.items():
            refs = _references(cfg, split, labels) if ft.prompt.references else None
            res["finetuned"][split] = _short(evaluate(ft.predict(dialogues, keys, references=refs), dialogues, labels))
        res["finetuned"]["seconds"] = time.time() - t0
        res["finetuned"]["train"] = read_meta(art_dir)["train"]
        del ft
    if e.baseline_shots and e.splits and cfg.prompt.template == "farcer-v1":  # the baseline scores per-utterance prompts
        train = load_dialogues(cfg.data.model_copy(update={"max_dialogues": {}}), cfg.data.train_split, {})
        sel, rest = e.splits[0], e.splits[1:]
        base = None
        for n in e.baseline_shots:
            shots = sample_shots(train, n, cfg.prompt.shot_seed, labels)
            prompt = cfg.prompt.model_copy(update={"n_shots": n})
            if base is None:
                base = MLLMPredictor.from_base(cfg.model.base, cfg.model.label_set, prompt, shots, e.batch_size)
                base.model.to(device)
            base.prompt, base.shots = prompt, shots
            dialogues, keys = data[sel]
            res["baseline"][f"{n}-shot"] = {sel: _short(evaluate(base.predict(dialogues, keys), dialogues, labels))}
        best = max(e.baseline_shots, key=lambda n: res["baseline"][f"{n}-shot"][sel]["weighted_f1"])
        res["baseline"]["chosen_shots"] = best
        base.prompt, base.shots = cfg.prompt.model_copy(update={"n_shots": best}), sample_shots(train, best, cfg.prompt.shot_seed, labels)
        for split in rest:
            dialogues, keys = data[split]
            res["baseline"][f"{best}-shot"][split] = _short(evaluate(base.predict(dialogues, keys), dialogues, labels))
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(res, indent=2))
    return res
