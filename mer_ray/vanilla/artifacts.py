"""The vanilla model's files, the only code that writes or reads them.

A model directory (or a Ray Train checkpoint) holds ``model.pt`` (the state
dict) and ``vanilla.json`` (model config, label orders, training facts); a
checkpoint adds ``optim.pt`` and ``state.json`` (epoch, history) to resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MODEL_FILE = "model.pt"
META_FILE = "vanilla.json"
STATE_FILE = "state.json"
OPTIM_FILE = "optim.pt"


def write_checkpoint(dirpath: str | Path, model, optimizer, scheduler, meta: dict, state: dict) -> None:
    """A resumable checkpoint: weights, optimizer and scheduler, ``state`` (epoch, history) and ``meta``."""
    d = Path(dirpath)
    torch.save(model.state_dict(), d / MODEL_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / OPTIM_FILE)
    (d / STATE_FILE).write_text(json.dumps(state, indent=1))
    (d / META_FILE).write_text(json.dumps(meta, indent=1))


def read_checkpoint(dirpath: str | Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint into ``model``, ``optimizer`` and ``scheduler``; returns its ``state``."""
    d = Path(dirpath)
    model.load_state_dict(torch.load(d / MODEL_FILE))
    opt = torch.load(d / OPTIM_FILE)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((d / STATE_FILE).read_text())


def checkpoint_states(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """Every checkpoint under a Ray Train run directory, with its ``state``."""
    return [(p.parent, json.loads(p.read_text())) for p in Path(run_dir).rglob(STATE_FILE)]


def export_model(checkpoint: str | Path, export_dir: str | Path, training: dict) -> Path:
    """Copy a checkpoint's weights and meta into a model directory, with ``training.json``."""
    out = Path(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in (MODEL_FILE, META_FILE):
        shutil.copy2(Path(checkpoint) / f, out / f)
    (out / "training.json").write_text(json.dumps(training, indent=1))
    return out


def read_meta(model_dir: str | Path) -> dict:
    """``vanilla.json`` of a model directory or checkpoint."""
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a vanilla model directory (no {META_FILE})")
    return json.loads(path.read_text())


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a model directory, on the CPU."""
    return torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu")
