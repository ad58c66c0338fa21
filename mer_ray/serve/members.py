"""The one place that wires the ensemble members to the other areas' predictors.

Each member is a plain object callable without Ray (Serve deployments
wrap them, the in-process benchmark calls them directly):

- :class:`VanillaMember`: ``mer_ray.vanilla.predict.VanillaPredictor`` over ``<models>/vanilla``;
- :class:`RefinerMember`: ``mer_ray.lantern.predict.LanternRefiner`` (llama.cpp or HTTP backend);
- :class:`FusionMember`: ``mer_ray.lantern.predict.FusionPredictor`` over ``<models>/fusion``;
- :class:`MLLMMember`: the fine-tuned multimodal LLM over ``<models>/mllm``;
- an ``mer ensemble`` run directory: the members of :mod:`mer_ray.serve.ensemble_run`.

Shapes: ``n`` utterances, ``C`` labels (the vanilla model's label order).
"""

from __future__ import annotations

import threading
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


class VanillaMember:
    """Vanilla model: feature rows -> ``emotion_probs`` [n, C] (+ ``sentiment_probs`` [n, S], ``vad`` [n, 3])."""

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.vanilla.predict import VanillaPredictor

        _threads(threads)
        self.predictor = VanillaPredictor.from_dir(Path(models_dir) / "vanilla", num_threads=threads)
        self.labels = list(self.predictor.emotion_labels)
        self.name = label_set_name(self.labels, self.predictor.meta)

    def label_set_name(self) -> str:
        return self.name

    @staticmethod
    def labels_of(models_dir: str) -> list[str]:
        from mer_ray.vanilla.artifacts import read_meta

        return list(read_meta(Path(models_dir) / "vanilla")["emotion_labels"])

    def predict(self, rows: list[dict]) -> dict:
        out = self.predictor.predict_dialogue(rows)
        return {"emotion_probs": np.asarray(out["emotion_probs"], dtype=np.float32), "sentiment_probs": out.get("sentiment_probs"),
                "sentiment_labels": self.predictor.sentiment_labels, "vad": out.get("vad")}


def _fusion_meta(models_dir: str) -> dict:
    from mer_ray.lantern.artifacts import read_meta

    return read_meta(Path(models_dir) / "fusion")


def refiner_settings(models_dir: str, llm: dict) -> dict:
    """Backend config and receptive fields for :class:`LanternRefiner`: explicit config, else what fusion was fitted on."""
    from mer_ray.lantern.queries import parse_sizes

    meta = _fusion_meta(models_dir)
    rec = meta.get("backend") or {}
    backend = {"kind": {"http": "openai"}.get(llm["backend"], llm["backend"]), "n_ctx": llm["n_ctx"], "n_threads": llm["n_threads"]}
    model = llm.get("model") or rec.get("model")
    if model:
        backend["model"] = model
    if llm.get("base_url"):
        backend["base_url"] = llm["base_url"]
    sizes = llm.get("sizes") or (parse_sizes(meta["sizes"]) if meta.get("sizes") else [4, None])
    from mer_ray.llm.prompts import DEFAULT_TEMPLATE

    template = llm.get("template") or meta.get("template") or DEFAULT_TEMPLATE
    return {"backend": backend, "sizes": sizes, "stride": llm.get("stride") or meta.get("stride") or 1, "template": template}


class RefinerMember:
    """Lantern LLM refiner: rows + vanilla outputs -> per-utterance LLM distributions and fields."""

    def __init__(self, models_dir: str, llm: dict, threads: int = 1, settings: dict | None = None,
                 labels: list[str] | None = None):
        """``settings``/``labels``: given (an ``mer ensemble`` run's prompt job), else what ``<models>/fusion`` records."""
        from mer_ray.lantern.predict import LanternRefiner

        _threads(threads)
        s = settings or refiner_settings(models_dir, llm)
        labels = labels or _fusion_meta(models_dir).get("labels") or VanillaMember.labels_of(models_dir)
        self.refiner = LanternRefiner.from_config(s["backend"], labels=labels, sizes=s["sizes"], stride=s["stride"],
                                                  template=s["template"], chat=s.get("chat", True))
        self.reuse = llm.get("reuse_prefix_across_requests", True)
        # Serve runs sync methods in a thread pool, so requests overlap; llama.cpp's context is not
        # thread-safe (overlapping calls crash the process): one request at a time per replica.
        self.lock = threading.Lock()

    def refine(self, rows: list[dict], vanilla: dict, targets: list[int]) -> dict:
        """``{"llm": [n] of [C] or None, "fields": [n] of [[first, last]], "detail": refiner output}``.

        ``llm`` is the mean over the fields that scored (uncalibrated); ``targets`` is informational:
        the refiner prompts every field of the dialogue.
        """
        with self.lock:
            llm = getattr(self.refiner.scorer, "llm", None)
            if not self.reuse and llm is not None:
                llm.reset()  # nothing carried over from the previous request
            out = self.refiner.refine([{"speaker": r.get("speaker"), "text": r.get("text")} for r in rows], vanilla)
        probs, fields = [], []
        for cands in out:
            ok = [c for c in cands if c["probs"] is not None]
            probs.append(np.mean([c["probs"] for c in ok], axis=0) if ok else None)
            fields.append([[int(c["start"]), int(c["end"]) - 1] for c in ok])
        return {"llm": probs, "fields": fields, "detail": out}


class FusionMember:
    """Receptive-field-aware fusion: vanilla [n, C] + refiner output -> fused [n, C]."""

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.lantern.predict import FusionPredictor

        _threads(threads)
        self.fusion = FusionPredictor.from_dir(Path(models_dir) / "fusion")

    def fuse(self, vanilla: np.ndarray, refined: dict) -> np.ndarray:
        return np.asarray(self.fusion.fuse(vanilla, refined["detail"]), dtype=np.float32)


class MLLMMember:
    """The fine-tuned multimodal LLM (FARCER-style adapter + projectors): rows -> [n, C].

    Its projectors read feature-store columns (``mer_mllm.json``: ``model.projectors.<modality>.feature``);
    a feature missing for an utterance is left out of the prompt, never zero-filled.
    """

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.mllm.artifacts import read_meta
        from mer_ray.mllm.predict import MLLMPredictor

        _threads(threads)
        art = Path(models_dir) / "mllm"
        self.predictor = MLLMPredictor.from_dir(art)
        meta = read_meta(art)
        projectors = (meta.get("model") or {}).get("projectors") or {}
        self.columns = {m: p["feature"] for m, p in projectors.items() if isinstance(p, dict) and p.get("feature")}
        self.lock = threading.Lock()  # requests overlap in Serve's thread pool; one LLM pass at a time

    def predict(self, rows: list[dict]) -> np.ndarray:
        feats = [{m: r.get(c) for m, c in self.columns.items() if r.get(c) is not None} for r in rows]
        with self.lock:
            out = self.predictor.predict_dialogue(rows, feats)
        return np.asarray(out["emotion_probs"], dtype=np.float32)
