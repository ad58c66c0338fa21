"""Ray Train (``TorchTrainer``) loop for the vanilla multi-task model.

Every epoch writes a checkpoint (weights, optimiser, scheduler, dev metrics).
A restarted run with the same ``name`` and ``storage_path`` resumes from the
last checkpoint. After training, the epoch with the best dev weighted F1 is
exported as a model directory that ``VanillaPredictor.from_dir`` loads.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mer_ray.vanilla import artifacts
from mer_ray.vanilla.model import VanillaConfig


class TrainConfig(BaseModel):
    """Training settings for one seed of the vanilla model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: VanillaConfig = Field(default_factory=VanillaConfig)
    """The architecture."""
    emotion_labels: str = "meld7"
    """Label set name of the emotion head (``mer_ray.data.labels``)."""
    sentiment_labels: str | None = "meld_sentiment3"
    """Label set of the auxiliary sentiment head (trained on the train split only); None: no head."""
    train_split: str = "train"
    """Value of the ``split`` column used for training."""
    dev_split: str = "dev"
    """Value of the ``split`` column used to select the epoch (its labels are never model inputs)."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    epochs: int = Field(3, ge=1)
    """Training epochs; one checkpoint each."""
    batch_utterances: int = Field(48, ge=1)
    """Dialogues are packed into batches of at most this many utterances."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of the projection, GRU and heads."""
    lr_encoder: float = Field(5e-5, gt=0)
    """Learning rate of the fine-tuned text encoder."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_frac: float = Field(0.1, ge=0, le=1)
    """Fraction of all steps spent in linear warm-up (then linear decay)."""
    sentiment_weight: float = Field(0.5, ge=0)
    """Weight of the sentiment loss."""
    vad_weight: float = Field(0.5, ge=0)
    """Weight of the (masked) VAD loss."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the emotion loss."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient-norm clip (0: off)."""
    num_threads: int = Field(2, ge=1)
    """torch threads in the training worker."""
    max_train_dialogues: int = Field(0, ge=0)
    """Use only the first N training dialogues (0: all); for quick runs."""
    fail_after_epoch: int = -1
    """Tests only: raise once after checkpointing this epoch, to exercise resuming."""
    progress_file: str | None = None
    """Tests only: after every batch the worker writes its pid, epoch and step here (JSON), so a
    fault-injection test can find the live worker and kill it mid-epoch."""


def read_store_split(store: str | Path, split: str):
    """The rows of one split from a feature store (Parquet dir/file) or None if it has none."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(str(store), format="parquet").to_table()
    if "split" not in table.column_names:
        raise ValueError(f"feature store {store} has no 'split' column; cannot find split {split!r}")
    return table.filter(pc.equal(table.column("split"), split))


def store_widths(table, cfg: VanillaConfig) -> dict[str, int]:
    """Widths of the encoder-sized columns (``image_embedding``, ``audio_embedding``) the model reads,
    from their first non-null value."""
    from mer_ray.vanilla.model import VARIABLE_DIMS

    out = {}
    for m in cfg.modalities:
        if m in VARIABLE_DIMS and m not in cfg.feature_dims and m in table.column_names:
            first = next((v for v in table.column(m).to_pylist() if v is not None), None)
            if first is None:
                raise ValueError(f"{m} is null in every training row: the store has no such feature to learn from")
            out[m] = len(first)
    return out


def fit_feature_scaling(train: list, cfg: VanillaConfig) -> dict[str, dict]:
    """Robust statistics of each frozen column over the train utterances where it is present
    (``{column: mer_ray.features.scaling.fit_scaling(...)}``); stored in ``vanilla.json``."""
    from mer_ray.features.scaling import fit_present

    return {m: fit_present([d.features[m][d.present[m]] for d in train], cfg.dim(m)) for m in cfg.modalities}


def train_loop_per_worker(config: dict) -> None:
    """Runs in the Ray Train worker: load data, resume if a checkpoint exists, train, report each epoch."""
    import ray.train

    from mer_ray.data.labels import get_label_set
    from mer_ray.eval.metrics import compute_metrics
    from mer_ray.vanilla.batches import collate, dialogues_from_table, length_batches
    from mer_ray.vanilla.model import build_vanilla
    from mer_ray.vanilla.steps import build_optimizer, predict_dialogues, train_step, warmup_linear

    cfg = TrainConfig.model_validate(config["train"])
    torch.set_num_threads(cfg.num_threads)
    emo = get_label_set(cfg.emotion_labels).labels
    sent = get_label_set(cfg.sentiment_labels).labels if cfg.sentiment_labels else None
    mcfg = cfg.model.model_copy(update={"n_emotions": len(emo), "n_sentiments": len(sent) if sent else 0})
    train_table = read_store_split(config["store"], cfg.train_split)
    mcfg = mcfg.model_copy(update={"feature_dims": {**store_widths(train_table, mcfg), **mcfg.feature_dims}})
    train = dialogues_from_table(train_table, mcfg, emo, sent)
    if cfg.max_train_dialogues:
        train = train[: cfg.max_train_dialogues]
    dev = dialogues_from_table(read_store_split(config["store"], cfg.dev_split), mcfg, emo)
    if not train or not dev:
        raise ValueError(f"empty split: {len(train)} train / {len(dev)} dev dialogues in {config['store']}")
    has_vad = bool(any(np.isfinite(d.vad).any() for d in train))
    # Standardise VAD targets on train so the regression loss is on the scale of the others.
    allv = np.concatenate([d.vad for d in train])
    vad_mean = np.nan_to_num(np.nanmean(allv, 0)) if has_vad else np.zeros(3)
    vad_std = np.nan_to_num(np.nanstd(allv, 0), nan=1.0).clip(1e-3) if has_vad else np.ones(3)
    for d in train:
        d.vad = (d.vad - vad_mean) / vad_std
    mcfg = mcfg.model_copy(update={"vad": has_vad})

    torch.manual_seed(cfg.seed)
    model = build_vanilla(mcfg)
    scaling = fit_feature_scaling(train, mcfg)
    model.set_scaling(scaling)
    if scaling:
        used = ", ".join(f"{m} ({st['n']} train rows)" for m, st in scaling.items())
        print(f"[vanilla] seed {cfg.seed}: {used}: robust statistics fitted on train (scaling: {mcfg.scaling})", flush=True)
    optimizer = build_optimizer(model, cfg.lr, cfg.lr_encoder, cfg.weight_decay)
    steps_per_epoch = len(length_batches(train, cfg.batch_utterances))
    scheduler = warmup_linear(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_frac)
    history: list[dict] = []
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            history = artifacts.read_checkpoint(d, model, optimizer, scheduler)["history"]
        start = history[-1]["epoch"] + 1
        print(f"[vanilla] resumed after epoch {start - 1}")

    meta = {"model": mcfg.model_dump(), "emotion_labels": list(emo), "sentiment_labels": list(sent) if sent else None,
            "has_vad": has_vad, "vad_mean": vad_mean.tolist(), "vad_std": vad_std.tolist(), "seed": cfg.seed,
            "feature_scaling": scaling}
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # same dropout stream whether resumed or not
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        batches = length_batches(train, cfg.batch_utterances, rng)
        losses = []
        for k, idx in enumerate(batches):
            batch = collate([train[i] for i in idx], mcfg)
            losses.append(train_step(model, batch, optimizer, scheduler, sentiment_weight=cfg.sentiment_weight,
                                     vad_weight=cfg.vad_weight, label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip)["total"])
            if cfg.progress_file:
                _write_progress(cfg.progress_file, epoch, k, len(batches), cfg.epochs)
            if k % 50 == 0:
                print(f"[vanilla] seed {cfg.seed} epoch {epoch} batch {k}/{len(batches)} loss {np.mean(losses[-50:]):.4f}", flush=True)
        probs = predict_dialogues(model, dev, mcfg)
        y_true = [emo[i] for d in dev for i in d.emotion]
        y_pred = [emo[i] for p in probs for i in p["emotion_probs"].argmax(-1)]
        m = compute_metrics(y_true, y_pred, emo)
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "dev_weighted_f1": m["weighted_f1"],
               "dev_accuracy": m["accuracy"], "dev_macro_f1": m["macro_f1"], "seconds": time.time() - t0, "resumed_run": start > 0}
        history.append(rec)
        print(f"[vanilla] seed {cfg.seed} epoch {epoch}: {json.dumps(rec)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            artifacts.write_checkpoint(tmp, model, optimizer, scheduler, meta, {**meta, "epoch": epoch, "history": history})
            ray.train.report({k: v for k, v in rec.items() if k != "resumed_run"}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if epoch == cfg.fail_after_epoch and start == 0:
            raise RuntimeError(f"fail_after_epoch={epoch}: simulated crash (tests)")


def _write_progress(path: str, epoch: int, batch: int, n_batches: int, epochs: int) -> None:
    """Atomically write the worker's pid and position (``step`` counts batches done since epoch 0)."""
    import os

    step = epoch * n_batches + batch + 1
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, "batch": batch, "n_batches": n_batches,
                                     "step": step, "total_steps": n_batches * epochs}))
    os.replace(tmp, path)


def fit(cfg: TrainConfig, store: str | Path, storage_path: str | Path, name: str, export_dir: str | Path | None = None,
        max_failures: int = 2) -> dict:
    """Train one seed with ``TorchTrainer`` (one worker), then export the best dev epoch.

    Args:
        cfg: training config.
        store: feature store with a ``split`` column.
        storage_path, name: where Ray Train keeps the run; reusing both resumes the run.
        export_dir: where to copy the best checkpoint as a model directory (``model.pt`` + ``vanilla.json``).
        max_failures: worker failures Ray Train retries (each retry resumes from the last checkpoint, and ends
            where an uninterrupted run ends: ``tests/chaos/test_train_faults.py``); 0 fails on the first.

    Returns:
        ``{"best_epoch", "best_checkpoint", "history", "export_dir"}``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path = Path(storage_path).resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(), "store": str(Path(store).resolve())},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage_path),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None)),
    )
    trainer.fit()
    return select_best(storage_path / name, export_dir)


def select_best(run_dir: str | Path, export_dir: str | Path | None = None) -> dict:
    """Pick the checkpoint with the best dev weighted F1 (earliest on ties) under a Ray Train run dir."""
    found = [(-s["history"][-1]["dev_weighted_f1"], s["epoch"], d, s) for d, s in artifacts.checkpoint_states(run_dir)]
    if not found:
        raise FileNotFoundError(f"no checkpoints under {run_dir}")
    found.sort(key=lambda t: (t[0], t[1]))
    _, epoch, best, _ = found[0]
    history = max(found, key=lambda t: t[1])[3]["history"]
    if export_dir is not None:
        export_dir = artifacts.export_model(best, export_dir, {"best_epoch": epoch, "history": history, "checkpoint": str(best)})
    return {"best_epoch": epoch, "best_checkpoint": str(best), "history": history, "export_dir": str(export_dir) if export_dir else None}
