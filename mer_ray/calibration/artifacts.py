"""``calibration.json``: the temperatures and conformal scores stored beside a models directory's models.

One file per models directory (a ``mer demo`` / ``mer pipeline`` models dir, or an ``mer ensemble`` run
dir). Serve, ``mer predict`` and the page read it through :class:`Calibration`; a directory without
it is served uncalibrated (``calibrated: false``, ``prediction_set: null``).

Distribution names (the keys of ``temperatures`` and ``conformal``) are what the API shows:

- ``final_llm``: ``probs`` when the request has ``use_llm: true`` (an ensemble run's fusion, or the
  Lantern fusion of a plain models dir);
- ``final_no_llm``: ``probs`` with ``use_llm: false`` (the vanilla model, or the seed average);
- ``vanilla``, ``llm``, ``mllm``: the per-member fields of an utterance's answer.

A name without a temperature is left as it is; a name without conformal scores gets no sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mer_ray.calibration.conformal import lac_threshold, prediction_set
from mer_ray.calibration.temperature import apply_temperature

CALIBRATION_FILE = "calibration.json"
DISTRIBUTIONS = ("final_llm", "final_no_llm", "vanilla", "llm", "mllm")


class ConformalScores(BaseModel):
    """Sorted nonconformity scores ``1 - p[gold]`` of the calibration utterances, in one label set.

    ``per_label[label]`` holds the scores of the utterances whose gold label is ``label`` (the
    class-conditional method); ``all`` holds every utterance's (the marginal method, and the fallback
    for a label with no calibration utterance).
    """

    model_config = ConfigDict(extra="forbid")

    labels: list[str]
    all: list[float]
    per_label: dict[str, list[float]]


class Calibration(BaseModel):
    """Everything calibration stores; see the module docstring for the names."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    label_set: str = Field(..., description="The models' own label set.")
    labels: list[str]
    temperatures: dict[str, float] = Field(..., description="Distribution name -> temperature T (> 0).")
    method: Literal["lac", "class_conditional_lac"] = Field(
        "class_conditional_lac", description="Split-conformal score rule: LAC (Sadinle et al., 2019), marginal or per gold label.")
    alpha_default: float = Field(0.1, gt=0, lt=1)
    alpha_range: tuple[float, float] = Field(..., description="[low, high] of the alphas these scores support.")
    conformal: dict[str, dict[str, ConformalScores]] = Field(
        default_factory=dict, description="Distribution name -> label set name -> scores.")
    fitted_on: dict = Field(default_factory=dict, description="Provenance: split, sizes, out-of-fold or not, source files.")

    @model_validator(mode="after")
    def _check(self) -> Calibration:
        bad = [k for k, t in self.temperatures.items() if not t > 0]
        if bad:
            raise ValueError(f"temperatures must be > 0: {bad}")
        lo, hi = self.alpha_range
        if not 0 < lo <= self.alpha_default <= hi < 1:
            raise ValueError(f"need 0 < alpha_range[0] <= alpha_default <= alpha_range[1] < 1, got {self.alpha_range}, {self.alpha_default}")
        return self

    # --- files

    def save(self, models_dir: str | Path) -> Path:
        path = Path(models_dir) / CALIBRATION_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, models_dir: str | Path) -> Calibration | None:
        """The directory's calibration, or None when it has none (a bad file raises, naming it)."""
        path = Path(models_dir) / CALIBRATION_FILE
        if not path.exists():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except Exception as e:  # noqa: BLE001 - re-raised with the file's name
            raise ValueError(f"{path}: not a valid calibration file: {e}") from e

    # --- use

    def calibrate(self, name: str, probs: np.ndarray) -> np.ndarray:
        """Temperature-scale ``probs`` [..., C] (model label order) for distribution ``name``; same argmax."""
        t = self.temperatures.get(name)
        return np.asarray(probs, dtype=np.float64) if t is None else apply_temperature(probs, t)

    def check_alpha(self, alpha: float) -> None:
        """Raise ``ValueError`` naming the supported range when ``alpha`` is outside it."""
        lo, hi = self.alpha_range
        if not lo <= alpha <= hi:
            raise ValueError(f"alpha {alpha} is outside the range this calibration supports: [{lo}, {hi}]")

    def has_sets(self, name: str, label_set: str) -> bool:
        return label_set in self.conformal.get(name, {})

    def prediction_sets(self, name: str, label_set: str, probs: np.ndarray, alpha: float | None = None) -> list[list[str]] | None:
        """Conformal sets for calibrated ``probs`` [n, C'] in ``label_set``'s order; None when not calibrated for it.

        Each set is ordered by probability, never empty, and always holds the argmax.
        """
        q = self.thresholds(name, label_set, alpha)
        if q is None:
            return None
        labels = self.conformal[name][label_set].labels
        return [prediction_set(p, q, labels) for p in np.asarray(probs, dtype=np.float64)]

    def thresholds(self, name: str, label_set: str, alpha: float | None = None) -> np.ndarray | None:
        """Per-label LAC thresholds ``[C']`` (``label_set``'s order) at ``alpha`` (None: the default); None when
        ``name`` has no scores in ``label_set``. A set holds each label whose ``1 - p`` is at most its threshold.

        Raises:
            ValueError: ``alpha`` is outside :attr:`alpha_range` (the message names the range).
        """
        sc = self.conformal.get(name, {}).get(label_set)
        if sc is None:
            return None
        alpha = self.alpha_default if alpha is None else alpha
        self.check_alpha(alpha)
        if self.method == "lac":
            return np.full(len(sc.labels), lac_threshold(sc.all, alpha))
        # a label no calibration utterance has (e.g. one no model label maps to) takes the marginal threshold
        q_all = lac_threshold(sc.all, alpha)
        return np.array([lac_threshold(sc.per_label[lab], alpha) if sc.per_label.get(lab) else q_all for lab in sc.labels])
