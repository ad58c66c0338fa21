"""The ensemble's request logic, written once for Serve and for in-process use.

:class:`Ensemble` holds one async callable per member. Under Serve each is a
``DeploymentHandle`` method (``await handle.m.remote(x)``); in process each is a
plain member object run in a thread (:meth:`Ensemble.local`). The benchmark
compares the two on exactly this code, so Serve's overhead is a ratio.

Shapes: ``n`` utterances, ``C`` labels of the model's label set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mer_ray.data.labelmap import mapping_matrix, project
from mer_ray.data.labels import MAPPINGS, get_label_set

if TYPE_CHECKING:
    from mer_ray.calibration.artifacts import Calibration

Member = Callable[..., Awaitable[Any]]


class LabelSetError(ValueError):
    """The requested label set cannot be answered from the model's (422)."""


def label_map(model_set: str, target: str | None) -> tuple[str, list[str], np.ndarray | None]:
    """Projection [C, C'] summing model-label mass into ``target`` labels (None: identity)."""
    if target is None or target == model_set:
        return model_set, list(get_label_set(model_set).labels), None
    mapping = MAPPINGS.get((model_set, target))
    if mapping is None:
        ok = [model_set] + sorted(t for s, t in MAPPINGS if s == model_set)
        raise LabelSetError(f"label_set {target!r} cannot be answered: the model predicts {model_set!r}, "
                            f"and there is no written-down mapping to {target!r}; available: {ok}")
    tgt = list(get_label_set(target).labels)
    return target, tgt, mapping_matrix(get_label_set(model_set).labels, tgt, mapping)


def project_rows(p, proj: np.ndarray | None) -> np.ndarray:
    """[n, C] model-label probabilities -> [n, C'] (labels without a counterpart drop out; rows renormalised)."""
    p = np.asarray(p, dtype=np.float64)
    return p if proj is None else project(p, proj)


def as_dist(p, labels: list[str]) -> dict[str, float]:
    """A [C] probability row -> ``{label: p}`` (the API's distribution shape)."""
    return {lab: float(v) for lab, v in zip(labels, p)}


class AlphaError(ValueError):
    """The request's ``alpha`` is outside the range the calibration supports (422)."""


def available_label_sets(model_set: str) -> list[str]:
    return [model_set] + sorted(t for s, t in MAPPINGS if s == model_set)


@dataclass
class Ensemble:
    """Async member callables; see the module docstring."""

    featurize: Member
    vanilla: Member
    label_set: Member
    refine: Member | None = None
    fuse: Member | None = None
    mllm: Member | None = None
    mllm_weight: float = 0.5
    members: dict[str, Member] | None = None
    """An ``mer ensemble`` run's fine-tuned LLM members: ``(rows, vanilla mean [n, C]) -> [n, C]``, by name."""
    ensemble_fuse: Member | None = None
    """That run's fitted fusion: ``(seeds, members, refiner detail or None) -> [n, C]``; set: the run's layout."""
    calibration: Calibration | None = None
    """The models dir's ``calibration.json`` (temperatures and conformal scores); None: answers are uncalibrated."""
    featurize_vanilla: Member | None = None
    """The co-located layout: ``utterances -> (rows, vanilla answer)`` in one call (one hop instead of two);
    None: ``featurize`` then ``vanilla``."""
    _label_set: str | None = field(default=None, init=False, repr=False)

    @classmethod
    def local(cls, featurizer, vanilla, refiner=None, fusion=None, mllm=None, mllm_weight: float = 0.5,
              members: dict | None = None, ensemble_fusion=None, calibration: Calibration | None = None) -> Ensemble:
        """Wrap plain member objects (no Ray): each call runs in a worker thread.

        ``calibration``: the models dir's (``Calibration.load(models_dir)``), as the Serve ingress loads it.
        """

        def th(fn):
            return None if fn is None else (lambda *a: asyncio.to_thread(fn, *a))

        llms = None if members is None else {name: th(m.predict) for name, m in members.items()}
        return cls(th(featurizer.featurize), th(vanilla.predict), th(vanilla.label_set_name),
                   th(refiner and refiner.refine), th(fusion and fusion.fuse), th(mllm and mllm.predict), mllm_weight,
                   llms, th(ensemble_fusion and ensemble_fusion.fuse), calibration)

    @property
    def has_llm(self) -> bool:
        """Whether ``use_llm`` changes anything: a refiner, or an ensemble run's fusion over LLM members."""
        return self.refine is not None or self.ensemble_fuse is not None

    async def _ensemble_run(self, rows: list[dict], van_out: dict, targets: list[int], timing: dict) -> tuple:
        """An ``mer ensemble`` run: refiner and fine-tuned members in parallel, then the fitted fusion.

        The refiner prompts with the seed the Lantern job prompted from; the members read the seed mean.
        """
        t = time.perf_counter()
        jobs = {name: m(rows, van_out["emotion_probs"]) for name, m in (self.members or {}).items()}
        if self.refine is not None:
            jobs[""] = self.refine(rows, van_out["lantern_reference"], targets)
        done = dict(zip(jobs, await asyncio.gather(*jobs.values())))
        timing["llm"] = (time.perf_counter() - t) * 1e3
        ref = done.pop("", None)
        t = time.perf_counter()
        fused = np.asarray(await self.ensemble_fuse(van_out["seeds"], done, ref and ref["detail"]), dtype=np.float64)
        timing["fusion"] = (time.perf_counter() - t) * 1e3
        n = len(rows)
        return fused, (ref["llm"] if ref else [None] * n), (ref["fields"] if ref else [[] for _ in range(n)])

    async def model_label_set(self) -> str:
        """The label set the models predict. Fixed for a deployment's lifetime, so asked once (a failed first call
        is not cached); the ingress and every request share this one answer."""
        if self._label_set is None:
            self._label_set = await self.label_set()
        return self._label_set

    def resolve_alpha(self, alpha: float | None) -> float | None:
        """The alpha a request's prediction sets use: its own, else the calibration's default (None: no calibration).

        Raises:
            AlphaError: ``alpha`` is outside the calibration's range (the message names the range).
        """
        cal = self.calibration
        if cal is None:
            return None  # nothing to make sets with; the answer says alpha: null
        alpha = cal.alpha_default if alpha is None else float(alpha)
        try:
            cal.check_alpha(alpha)
        except ValueError as e:
            raise AlphaError(str(e)) from None
        return alpha

    async def predict_rows(self, rows: list[dict], use_llm: bool, label_set: str | None, targets: list[int] | None = None,
                           timing: dict[str, float] | None = None, alpha: float | None = None,
                           vanilla_out: dict | None = None) -> dict:
        """Predict a featurized dialogue; ``targets`` limits the answer (and the LLM work) to some positions.

        ``alpha``: the prediction sets' miscoverage (None: the calibration's default). ``vanilla_out``: the
        vanilla answer for ``rows`` when the caller already has it (the co-located layout), else asked here.
        """
        timing = {} if timing is None else timing
        alpha = self.resolve_alpha(alpha)
        model_set = await self.model_label_set()
        name, labels, proj = label_map(model_set, label_set)
        n = len(rows)
        targets = list(range(n)) if targets is None else targets
        t = time.perf_counter()
        # emotion_probs [n, C], sentiment_probs, vad (prompt references)
        van_out = vanilla_out if vanilla_out is not None else await self.vanilla(rows)
        van = np.asarray(van_out["emotion_probs"], dtype=np.float64)
        timing.setdefault("vanilla", (time.perf_counter() - t) * 1e3)
        fused, llm, fields = van, [None] * n, [[] for _ in range(n)]
        jobs = {}
        if self.ensemble_fuse is not None:  # an `mer ensemble` run: its own fusion; without the LLM, the seed mean
            if use_llm:
                fused, llm, fields = await self._ensemble_run(rows, van_out, targets, timing)
        elif use_llm and self.refine is not None:
            jobs["llm"] = self.refine(rows, van_out, targets)
        if self.mllm is not None:
            jobs["mllm"] = self.mllm(rows)
        t = time.perf_counter()
        done = dict(zip(jobs, await asyncio.gather(*jobs.values())))
        if "llm" in done:
            ref = done["llm"]  # {"llm": [n] of [C] or None, "fields": [n] of [[first, last]], ...}
            timing["llm"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            fused = np.asarray(await self.fuse(van_out["emotion_probs"], ref), dtype=np.float64)
            timing["fusion"] = (time.perf_counter() - t) * 1e3
            llm, fields = ref["llm"], ref["fields"]
        mllm = done.get("mllm")
        if mllm is not None:
            timing["mllm"] = (time.perf_counter() - t) * 1e3
            mllm = np.asarray(mllm, dtype=np.float64)
            fused = (1 - self.mllm_weight) * fused + self.mllm_weight * mllm
        final = "final_llm" if use_llm and self.has_llm else "final_no_llm"
        members = {"vanilla": van, "llm": llm, "mllm": mllm}
        return self._answer(name, labels, proj, final, fused, members, fields, targets, alpha, timing)

    def _calibrated(self, dist: str, p, proj: np.ndarray | None) -> np.ndarray:
        """Temperature on the model's labels (where it was fitted), then the label-set projection: [n, C] -> [n, C']."""
        p = np.asarray(p, dtype=np.float64)
        return project_rows(p if self.calibration is None else self.calibration.calibrate(dist, p), proj)

    def _member(self, dist: str, p, proj: np.ndarray | None, labels: list[str], k: int) -> list[dict | None]:
        """A member's ``k`` calibrated rows as dicts: ``p`` is [k, C], a list of [C] or None (not scored), or None."""
        if p is None:
            return [None] * k
        if isinstance(p, np.ndarray):
            return [as_dist(r, labels) for r in self._calibrated(dist, p, proj)]
        return [None if r is None else as_dist(self._calibrated(dist, np.asarray(r)[None], proj)[0], labels) for r in p]

    def _answer(self, name: str, labels: list[str], proj, final: str, fused: np.ndarray, members: dict, fields: list,
                targets: list[int], alpha: float | None, timing: dict) -> dict:
        """The response dict for the ``targets`` rows: calibrated distributions, prediction sets, the calibration used.

        ``final`` names the distribution ``probs`` is calibrated (and its sets made) as: ``final_llm``/``final_no_llm``.
        """
        cal, k = self.calibration, len(targets)
        raw = project_rows(fused[targets], proj)
        probs = self._calibrated(final, fused[targets], proj)
        sets = None if cal is None else cal.prediction_sets(final, name, probs, alpha)
        at = {m: None if v is None else (v[targets] if isinstance(v, np.ndarray) else [v[i] for i in targets]) for m, v in members.items()}
        per = {m: self._member(m, v, proj, labels, k) for m, v in at.items()}
        out = []
        for j, i in enumerate(targets):
            p = as_dist(probs[j], labels)
            out.append({"label": max(p, key=p.get), "probs": p, "probs_uncalibrated": as_dist(raw[j], labels),
                        "prediction_set": None if sets is None else sets[j], **{m: per[m][j] for m in per},
                        "receptive_fields": [list(map(int, f)) for f in fields[i]]})
        conformal = None if sets is None else {"method": cal.method, "alpha_range": list(cal.alpha_range)}
        return {"label_set": name, "labels": labels, "utterances": out, "calibrated": cal is not None,
                "alpha": None if sets is None else alpha, "conformal": conformal, "timing_ms": timing}

    async def recognize(self, utterances: list[dict], use_llm: bool = True, label_set: str | None = None,
                        alpha: float | None = None) -> dict:
        """One dialogue of plain utterance dicts (``speaker``, ``text``, optional media bytes) -> response dict."""
        self.resolve_alpha(alpha)  # refuse a bad alpha before the featurizer's work
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        van_out = None
        if self.featurize_vanilla is not None:  # one call does both: `features` is that call, `vanilla` 0
            rows, van_out = await self.featurize_vanilla(utterances)
            timing["vanilla"] = 0.0
        else:
            rows = await self.featurize(utterances)
        timing["features"] = (time.perf_counter() - t0) * 1e3
        out = await self.predict_rows(rows, use_llm, label_set, timing=timing, alpha=alpha, vanilla_out=van_out)
        timing["total"] = (time.perf_counter() - t0) * 1e3
        return out
