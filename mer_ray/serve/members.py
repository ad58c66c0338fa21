"""The one place that wires the ensemble members to the other areas' predictors.

Each member is a plain object callable without Ray (Serve deployments
wrap them, the in-process benchmark calls them directly):

- :class:`VanillaMember`: ``mer_ray.vanilla.predict.VanillaPredictor`` over ``<models>/vanilla``;
- :class:`RefinerMember`: ``mer_ray.lantern.predict.LanternRefiner`` (llama.cpp or HTTP backend);
- :class:`FusionMember`: ``mer_ray.lantern.predict.FusionPredictor`` over ``<models>/fusion``;
- :class:`MLLMMember`: the fine-tuned multimodal LLM over ``<models>/mllm``;
- an ``mer ensemble`` run directory: the members of :mod:`mer_ray.serve.ensemble_run`.

Batched members (the Featurizer and Vanilla deployments run them under ``@serve.batch``) take a
list of dialogues and answer a list of the same length in which a dialogue that failed holds its
exception, so one bad request never fails the others of its batch (:func:`isolated`).

Every member has ``probe()``: its model on a tiny fixed input, for the deployments' ``check_health``.

Shapes: ``n`` utterances, ``C`` labels (the vanilla model's label order), ``D`` dialogues in a batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
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


#: The probe's one fixed utterance: no features at all (every frozen modality takes its learned "missing" vector).
PROBE_ROW = {"turn": 0, "speaker": "A", "text": "ok", "status": "ok", "error": None}
#: A call holding an engine lock this long is taken as wedged by the health check (an LLM request under load
#: took up to 130 s in the bench; ten minutes is far beyond any real request).
STALL_S = 600.0
#: An LLM engine that answered a call this recently is not probed again (a probe costs a prompt's CPU).
FRESH_S = 60.0


def isolated(batch_fn: Callable[[list], list], one_fn: Callable, items: Sequence) -> list:
    """``batch_fn(items)``; if the batch raises, each item alone, so only the bad ones hold their exception.

    Returns:
        ``[D]`` results, an item's exception in its place where it failed.
    """
    try:
        return list(batch_fn(list(items)))
    except Exception:
        out = []
        for it in items:
            try:
                out.append(one_fn(it))
            except Exception as e:  # answered to that request alone
                out.append(e)
        return out


def check_probs(p, what: str) -> None:
    """Raise ``RuntimeError`` unless ``p`` [n, C] is finite and every row sums to 1 (what a healthy model gives)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or not np.isfinite(p).all() or np.abs(p.sum(-1) - 1).max() > 1e-3:
        raise RuntimeError(f"{what}: the health probe gave {p.shape} probabilities that are not distributions: {p!r}")


class EngineLock:
    """A lock that knows since when it is held and when a call last succeeded under it, so a health check
    can tell a busy engine from a wedged one without loading an LLM replica with probes."""

    def __init__(self):
        self._lock = threading.Lock()
        self.since: float | None = None
        self.last_ok = float("-inf")

    def __enter__(self) -> EngineLock:
        self._lock.acquire()
        self.since = time.monotonic()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.last_ok = time.monotonic()
        self.since = None
        self._lock.release()

    def probe(self, fn: Callable[[], object], what: str, stall_s: float = STALL_S, fresh_s: float = FRESH_S) -> None:
        """Run ``fn`` on a free engine, unless a call succeeded in the last ``fresh_s`` (proof enough); on a busy
        engine pass, unless the running call is older than ``stall_s``.

        Raises:
            RuntimeError: the running call has held the engine for more than ``stall_s``, or ``fn`` failed.
        """
        if not self._lock.acquire(blocking=False):
            held = time.monotonic() - (self.since or time.monotonic())
            if held > stall_s:
                raise RuntimeError(f"{what}: one call has held the engine for {held:.0f} s (> {stall_s:.0f} s): wedged")
            return  # busy with a request that is still young: that is progress, not a failure
        try:
            if time.monotonic() - self.last_ok > fresh_s:
                fn()
                self.last_ok = time.monotonic()
        except Exception as e:
            raise RuntimeError(f"{what}: the health probe failed: {e!r}") from e
        finally:
            self._lock.release()


def _dialogue_columns(rows: Sequence[dict], modalities: Sequence[str], dialogue_id: str) -> dict[str, list]:
    """One dialogue's columns for ``VanillaPredictor.predict_table`` (validated as ``predict_dialogue`` does)."""
    if not rows:
        raise ValueError("a dialogue needs at least one utterance")
    for i, u in enumerate(rows):
        if "text" not in u or "speaker" not in u:
            raise ValueError(f"utterance {i} lacks 'text' or 'speaker': {sorted(u)}")
    turns = [int(u.get("turn", i)) for i, u in enumerate(rows)]
    if len(set(turns)) != len(rows):
        raise ValueError(f"duplicate turns in {turns}")
    cols = {"dialogue_id": [dialogue_id] * len(rows), "turn": turns, "speaker": [u["speaker"] or "" for u in rows],
            "text": [u["text"] or "" for u in rows]}
    for m in modalities:
        cols[m] = [None if u.get(m) is None else [float(x) for x in u[m]] for u in rows]
    return cols


def predict_many(predictor, dialogues: Sequence[Sequence[dict]]) -> list[dict]:
    """``VanillaPredictor`` outputs for ``D`` dialogues in one ``predict_table`` call (one forward pass per
    256 utterances), each dialogue's rows in the order given.

    Exact per dialogue: the model keeps dialogues apart (dialogue-local speaker slots, a packed BiGRU over
    each dialogue's own length, text-encoder sequences of one utterance or one dialogue's window, masked
    padding), so batching changes a dialogue's answer only by float rounding of padded matmuls.

    Raises:
        ValueError: a dialogue is malformed (use :func:`isolated` to keep it from failing the others).
    """
    import pyarrow as pa

    cols: dict[str, list] = {}
    for k, rows in enumerate(dialogues):  # zero-padded ids: predict_table's (dialogue_id, turn) order is k's order
        for c, v in _dialogue_columns(rows, predictor.cfg.modalities, f"{k:08d}").items():
            cols.setdefault(c, []).extend(v)
    out = predictor.predict_table(pa.table(cols))
    res, start = [], 0
    for rows in dialogues:
        turns = [int(u.get("turn", i)) for i, u in enumerate(rows)]
        order = np.argsort(turns, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))  # predict_table's rows are sorted by turn within the dialogue
        sl = slice(start, start + len(rows))
        res.append({key: (None if v is None else v[sl][inv]) for key, v in out.items()})
        start += len(rows)
    return res


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

    def _answer(self, out: dict) -> dict:
        return {"emotion_probs": np.asarray(out["emotion_probs"], dtype=np.float32), "sentiment_probs": out.get("sentiment_probs"),
                "sentiment_labels": self.predictor.sentiment_labels, "vad": out.get("vad")}

    def predict(self, rows: list[dict]) -> dict:
        return self._answer(self.predictor.predict_dialogue(rows))

    def predict_batch(self, dialogues: list[list[dict]]) -> list[dict | Exception]:
        """:meth:`predict` of ``D`` dialogues in one forward pass; ``[D]`` answers (a failed dialogue: its exception)."""
        return isolated(lambda ds: [self._answer(o) for o in predict_many(self.predictor, ds)], self.predict, dialogues)

    def probe(self) -> None:
        """The model on one fixed utterance; ``RuntimeError`` unless it gives a distribution."""
        check_probs(self.predict([PROBE_ROW])["emotion_probs"], "Vanilla")


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
        # thread-safe (overlapping calls crash the process): one request at a time per replica. Requests are
        # never merged into one engine call either (docs/lantern.md: llama.cpp's multi-sequence problem).
        self.lock = EngineLock()

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

    def probe(self) -> None:
        """One short prompt (the content-free one) through the engine, when it is free (see :class:`EngineLock`)."""
        self.lock.probe(lambda: check_probs(np.asarray(self.refiner.content_free())[None], "LLMRefiner"), "LLMRefiner")


class FusionMember:
    """Receptive-field-aware fusion: vanilla [n, C] + refiner output -> fused [n, C]."""

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.lantern.predict import FusionPredictor

        _threads(threads)
        self.fusion = FusionPredictor.from_dir(Path(models_dir) / "fusion")

    def fuse(self, vanilla: np.ndarray, refined: dict) -> np.ndarray:
        return np.asarray(self.fusion.fuse(vanilla, refined["detail"]), dtype=np.float32)

    def probe(self) -> None:
        """The fusion on one utterance with one uniform LLM candidate; ``RuntimeError`` unless a distribution."""
        c = len(self.fusion.labels)
        u = np.full((1, c), 1.0 / c, dtype=np.float32)
        cand = {"start": 0, "end": 1, "size": 1, "error": None, "probs": u[0]}
        check_probs(self.fuse(u, {"detail": [[cand]]}), "Fusion")


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
        self.lock = EngineLock()  # requests overlap in Serve's thread pool; one LLM pass at a time

    def _predict(self, rows: list[dict]) -> np.ndarray:
        feats = [{m: r.get(c) for m, c in self.columns.items() if r.get(c) is not None} for r in rows]
        return np.asarray(self.predictor.predict_dialogue(rows, feats)["emotion_probs"], dtype=np.float32)

    def predict(self, rows: list[dict]) -> np.ndarray:
        with self.lock:
            return self._predict(rows)

    def probe(self) -> None:
        """The LLM on one fixed utterance (text only), when it is free (see :class:`EngineLock`)."""
        self.lock.probe(lambda: check_probs(self._predict([PROBE_ROW]), "MLLM"), "MLLM")
