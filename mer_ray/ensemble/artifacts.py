"""The ensemble fusion's files, the only code that writes or reads them.

A ``fusion/`` directory of an ensemble run holds ``ensemble_fusion.json`` (labels,
the member and candidate order, the feature layout, the selected setting and
Lantern's calibration) and, when a fusion beat the vanilla average on dev,
``ensemble_fusion.pt`` (the :class:`~mer_ray.lantern.model.RFAttentionFusion`
state dict). The names differ from Lantern's ``fusion/`` files: the feature
layout differs, so Lantern's predictor must not load these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_FILE = "ensemble_fusion.json"
WEIGHTS_FILE = "ensemble_fusion.pt"


def write_ensemble_fusion(fdir: str | Path, config: dict, state: dict[str, torch.Tensor] | None) -> Path:
    """Write the config and, unless ``state`` is None (vanilla average selected), the weights."""
    fdir = Path(fdir)
    fdir.mkdir(parents=True, exist_ok=True)
    (fdir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    weights = fdir / WEIGHTS_FILE
    if state is not None:
        torch.save(state, weights)
    elif weights.exists():
        weights.unlink()  # a stale fit from an earlier run must not be served with this config
    return fdir


def read_ensemble_config(fdir: str | Path) -> dict:
    """The fusion config; an empty dict when the directory has none."""
    p = Path(fdir) / CONFIG_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def read_ensemble_weights(fdir: str | Path) -> dict[str, torch.Tensor] | None:
    """The fusion module's state dict; None when the vanilla average was selected."""
    p = Path(fdir) / WEIGHTS_FILE
    return torch.load(p, weights_only=True) if p.exists() else None
