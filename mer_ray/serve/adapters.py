"""The one place that wires the served stages to the other areas' predictors.

Each served stage is a plain object callable without Ray (Serve deployments
wrap them, the in-process benchmark calls them directly):

- :class:`VanillaStage`: ``mer_ray.predictors.VanillaPredictor`` over ``<models>/vanilla``;
- :class:`RefinerStage`: ``mer_ray.lantern.LanternRefiner`` (llama.cpp or HTTP backend);
- :class:`FusionStage`: ``mer_ray.lantern.FusionPredictor`` over ``<models>/fusion``;
- :class:`MLLMStage`: the fine-tuned multimodal LLM over ``<models>/mllm``.

Shapes: ``n`` utterances, ``C`` labels (the vanilla model's label order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mer_ray.data.labels import LABEL_SETS


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def label_set_name(labels, meta: dict | None = None) -> str:
    """The registered label-set name whose labels equal ``labels`` (``custom`` if none)."""
    if meta and meta.get("label_set") in LABEL_SETS:
        return meta["label_set"]
    for name, ls in LABEL_SETS.items():
        if tuple(ls.labels) == tuple(labels):
            return name
    return "custom"


class VanillaStage:
    """Vanilla model: feature rows -> emotion distributions [n, C]."""

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.predictors import VanillaPredictor

        _threads(threads)
        self.predictor = VanillaPredictor.from_dir(Path(models_dir) / "vanilla", num_threads=threads)
        self.labels = list(self.predictor.emotion_labels)
        self.name = label_set_name(self.labels, self.predictor.meta)

    def label_set_name(self) -> str:
        return self.name

    def predict(self, rows: list[dict]) -> np.ndarray:
        return np.asarray(self.predictor.predict_dialogue(rows)["emotion_probs"], dtype=np.float32)


class RefinerStage:
    """Lantern LLM refiner: rows + vanilla [n, C] -> per-utterance LLM distributions and fields."""

    def __init__(self, models_dir: str, llm: dict, threads: int = 1):
        from mer_ray.lantern import LanternRefiner

        _threads(threads)
        self.refiner = LanternRefiner.for_serving(models_dir=models_dir, **llm)

    def refine(self, rows: list[dict], vanilla: np.ndarray, targets: list[int]) -> dict:
        """Returns ``{"llm": [n] of [C] or None, "fields": [n] of [[first, last]], "detail": ...}``.

        ``targets``: positions whose answer is needed; the refiner prompts only fields covering them.
        """
        out = self.refiner.refine(rows, vanilla, targets=targets)
        return {"llm": out["llm"], "fields": out["fields"], "detail": out}


class FusionStage:
    """Receptive-field-aware fusion: vanilla [n, C] + refiner output -> fused [n, C]."""

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.lantern import FusionPredictor

        _threads(threads)
        self.fusion = FusionPredictor.from_dir(Path(models_dir) / "fusion")

    def fuse(self, vanilla: np.ndarray, refined: dict) -> np.ndarray:
        return np.asarray(self.fusion.fuse(vanilla, refined["detail"]), dtype=np.float32)


class MLLMStage:
    """The fine-tuned multimodal LLM (FARCER-style adapter + projectors): rows -> [n, C].

    Its projectors read feature-store columns (``mer_mllm.json``: ``model.projectors.<modality>.feature``);
    a feature missing for an utterance is left out of the prompt, never zero-filled.
    """

    def __init__(self, models_dir: str, threads: int = 1):
        import json

        from mer_ray.models.mllm_build import ARTIFACT_JSON
        from mer_ray.mllm_predict import MLLMPredictor

        _threads(threads)
        art = Path(models_dir) / "mllm"
        self.predictor = MLLMPredictor.from_dir(art)
        meta = json.loads((art / ARTIFACT_JSON).read_text())
        projectors = (meta.get("model") or {}).get("projectors") or {}
        self.columns = {m: p["feature"] for m, p in projectors.items() if isinstance(p, dict) and p.get("feature")}

    def predict(self, rows: list[dict]) -> np.ndarray:
        feats = [{m: r.get(c) for m, c in self.columns.items() if r.get(c) is not None} for r in rows]
        return np.asarray(self.predictor.predict_dialogue(rows, feats)["emotion_probs"], dtype=np.float32)


def train_demo_models(models_dir: Path) -> None:
    """Train the ``make demo`` models into ``models_dir`` (= ``<demo run>/models``) with the demo's own stages.

    Runs :data:`mer_ray.demo.STAGES` (progress printed by the demo) except a stage named ``serve``,
    which would start a second server.
    """
    from mer_ray.demo import STAGES, run_demo

    run_demo(Path(models_dir).parent, stages=[(n, f) for n, f in STAGES if n != "serve"])
