"""The fusion model's files, the only code that writes or reads them.

A ``fusion/`` directory holds ``fusion.json`` (labels, selected setting, calibration,
the receptive fields and the LLM it was fitted on) and, when a fusion beat vanilla
on dev, ``fusion.pt`` (the module's state dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

META_FILE = "fusion.json"
WEIGHTS_FILE = "fusion.pt"


def write_fusion(fdir: str | Path, meta: dict, state: dict[str, torch.Tensor] | None) -> Path:
    """Write ``fusion.json`` and, unless ``state`` is None (vanilla selected), ``fusion.pt``."""
    fdir = Path(fdir)
    fdir.mkdir(parents=True, exist_ok=True)
    (fdir / META_FILE).write_text(json.dumps(meta, indent=2))
    if state is not None:
        torch.save(state, fdir / WEIGHTS_FILE)
    return fdir


def read_meta(fdir: str | Path) -> dict:
    """``fusion.json``; an empty dict when the directory has none."""
    p = Path(fdir) / META_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def read_weights(fdir: str | Path) -> dict[str, torch.Tensor]:
    """The fusion module's state dict."""
    return torch.load(Path(fdir) / WEIGHTS_FILE, weights_only=True)
