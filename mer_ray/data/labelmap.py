"""A corpus's own label set as a YAML map onto the model's labels: ``{target_label: [model labels...]}``.

The map is read into a projection ``[C, C']`` and applied by :func:`project`:
each target's probability is the sum of its model labels' probabilities,
renormalised over the targets, so model labels that no target lists drop out
(Serve's ``label_set`` mapping does the same sum-and-renormalise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class LabelMapError(ValueError):
    """A label map that cannot be applied; the message names the file and the key."""


@dataclass(frozen=True)
class LabelMap:
    """A parsed label map.

    Attributes:
        path: the YAML file it came from (named in errors and in output metadata).
        targets: the target labels, in the file's order (the columns of every mapped distribution).
        sources: ``{target: [model labels]}`` as written.
    """

    path: str
    targets: tuple[str, ...]
    sources: dict[str, list[str]]

    def projection(self, model_labels: Sequence[str]) -> np.ndarray:
        """``[C, C']`` with 1 where a model label feeds a target (the matrix Serve's mapping multiplies by)."""
        model_labels = list(model_labels)
        proj = np.zeros((len(model_labels), len(self.targets)), dtype=np.float64)
        for j, t in enumerate(self.targets):
            for lab in self.sources[t]:
                if lab not in model_labels:
                    raise LabelMapError(f"{self.path}: key {t!r} lists {lab!r}, which the model does not predict; "
                                        f"model labels: {model_labels}")
                proj[model_labels.index(lab), j] = 1.0
        return proj

    def apply(self, probs: np.ndarray, model_labels: Sequence[str]) -> np.ndarray:
        """Map ``[N, C]`` model distributions to ``[N, C']`` target distributions (sum, then renormalise)."""
        return project(probs, self.projection(model_labels))


def mapping_matrix(source_labels: Sequence[str], target_labels: Sequence[str], mapping: dict[str, str | None]) -> np.ndarray:
    """``[C, C']`` with 1 where ``mapping`` (a written-down ``MAPPINGS`` entry) sends a source label; None drops out."""
    target_labels = list(target_labels)
    proj = np.zeros((len(source_labels), len(target_labels)), dtype=np.float64)
    for i, lab in enumerate(source_labels):
        if mapping.get(lab) is not None:
            proj[i, target_labels.index(mapping[lab])] = 1.0
    return proj


def project(probs: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """``[N, C] @ [C, C']``, each row renormalised; a row with no mass left becomes uniform."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1, proj.shape[0]) @ proj
    s = p.sum(1, keepdims=True)
    return np.where(s > 0, p / np.where(s > 0, s, 1.0), 1.0 / proj.shape[1])


def read_label_map(path: str | Path) -> LabelMap:
    """Read and check a label-map YAML.

    Raises:
        LabelMapError: not a mapping, a target listing no label (or a non-string), or a model label under two
            targets (its mass would count twice); each names the file and the key.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LabelMapError(f"label map not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LabelMapError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise LabelMapError(f"{p}: expected a mapping {{target_label: [model labels...]}}, got {type(raw).__name__}")
    sources: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key, val in raw.items():
        labels = [val] if isinstance(val, str) else val
        if not isinstance(key, str) or not key:
            raise LabelMapError(f"{p}: key {key!r} is not a label name")
        if not isinstance(labels, list) or not labels:
            raise LabelMapError(f"{p}: key {key!r} lists no model label; give e.g. {key}: [{key}]")
        if not all(isinstance(lab, str) and lab for lab in labels):
            raise LabelMapError(f"{p}: key {key!r} must list model label names, got {labels!r}")
        for lab in labels:
            if lab in owner:
                raise LabelMapError(f"{p}: model label {lab!r} is listed under both {owner[lab]!r} and {key!r}")
            owner[lab] = key
        sources[key] = list(labels)
    return LabelMap(str(p), tuple(sources), sources)
