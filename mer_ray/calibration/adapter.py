"""Calibrate one fine-tuned adapter: a temperature and conformal scores for its distribution (``mllm``).

An adapter (``<models>/mllm/adapters/<name>/``) answers alone, in its own label set, so it carries its
own ``calibration.json``, fitted on its own dev predictions (``mer predict llm --model ADAPTER_DIR
--split dev``). The adapter is fine-tuned on train only, so its dev predictions are out of fold.
Gold labels come from MELD's CSVs or a manifest and are used for fitting only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mer_ray.calibration.artifacts import Calibration
from mer_ray.calibration.calibrate import fit_calibration
from mer_ray.calibration.sources import Key, gold_indices


def adapter_dir(models_dir: str | Path, name: str) -> Path:
    """``<models>/mllm/adapters/<name>``, which must be an installed adapter (ValueError naming the known ones)."""
    from mer_ray.mllm.adapters import adapters_root, list_adapters

    known = list_adapters(models_dir)
    if name not in known:
        raise ValueError(f"unknown adapter {name!r} in {models_dir}; known adapters: {sorted(known)}")
    return adapters_root(models_dir) / name


def calibrate_adapter(models_dir: str | Path, name: str, predictions: str | Path, gold: dict[Key, str], *,
                      method: str = "class_conditional_lac", alpha: float = 0.1, k: int = 5, seed: int = 0) -> Calibration:
    """Fit adapter ``name``'s calibration on its dev predictions and write its ``calibration.json``.

    Args:
        models_dir: the models directory that holds the adapter.
        predictions: ``mer predict llm`` output for the dev split: ``dialogue_id``, ``turn``, ``split``,
            ``emotion_probs`` ``[N, C]`` in the adapter's label order (schema metadata ``emotion_labels``).
        gold: ``{(dialogue_id, turn): label}`` of the dev utterances.
        method, alpha, k, seed: as :func:`~mer_ray.calibration.calibrate.fit_calibration`.

    Returns:
        The saved calibration (temperature ``mllm``; conformal scores ``mllm`` in every label set its labels reach).

    Raises:
        ValueError: an unknown adapter, predictions of another split or label order, or missing gold.
    """
    from mer_ray.mllm.artifacts import read_meta

    d = adapter_dir(models_dir, name)
    meta = read_meta(d)
    table = pq.read_table(predictions)
    labels = json.loads((table.schema.metadata or {}).get(b"emotion_labels", b"null"))
    if labels != list(meta["labels"]):
        raise ValueError(f"{predictions}: labels {labels} are not adapter {name!r}'s {meta['labels']} "
                         f"(make them with mer predict llm --model {d} --split dev)")
    splits = set(table["split"].to_pylist())
    if splits != {"dev"}:
        raise ValueError(f"{predictions}: calibration fits on dev only, these rows are split {sorted(splits)}")
    keys = list(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist()))
    y = gold_indices(keys, gold, labels, str(predictions))
    probs = np.asarray(table["emotion_probs"].to_pylist(), dtype=np.float64)
    groups = np.array([key[0] for key in keys])
    prov = {"kind": "adapter", "adapter": name, "predictions": str(predictions), "distributions": {
        "mllm": {"files": str(predictions), "out_of_fold": True, "how": "adapter fine-tuned on train, not fitted on dev"}}}
    cal = fit_calibration({"mllm": probs}, y, groups, labels, label_set=meta["label_set"], conformal_names=("mllm",),
                          method=method, alpha=alpha, k=k, seed=seed, fitted_on=prov)
    cal.save(d)
    return cal
