"""The fine-tuning job's config (one YAML in ``jobs/``) and its DeepSpeed config.

A YAML has the sections ``model``, ``prompt``, ``data``, ``train``, ``ray``,
``eval``, plus ``deepspeed`` (a JSON file, relative to the repository or to
``mer_ray/mllm/deepspeed/``) and ``out``. Unknown keys are errors. Overrides
use dotted keys: ``train.max_steps=5``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mer_ray.mllm.build import ModelConfig
from mer_ray.mllm.examples import DataConfig, PromptConfig

DS_DIR = Path(__file__).parent / "deepspeed"


class TrainSettings(BaseModel):
    """Optimisation."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["projector", "lora", "coarse_to_fine"] = Field(
        "lora", description="projector only; projector + LoRA; Emotion-LLaMA phase 1 projectors, phase 2 LoRA + projectors."
    )
    max_steps: int = Field(100, gt=0, description="Optimizer steps in all (both phases).")
    epochs: float | None = Field(None, gt=0, description="Train this many passes over the training examples (sets max_steps from the data size).")
    phase1_steps: int = Field(0, ge=0, description="coarse_to_fine: steps of phase 1 (projectors only).")
    time_budget_min: float | None = Field(None, gt=0, description="Stop (and export) once training has run this many minutes.")
    micro_batch: int = Field(2, gt=0, description="Examples per worker per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="LoRA learning rate.")
    projector_lr: float = Field(1e-3, gt=0, description="Projector learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    checkpoint_every: int = Field(50, gt=0, description="Report a DeepSpeed checkpoint to Ray every N steps.")
    checkpoint_every_min: float | None = Field(10.0, gt=0, description="Also checkpoint once this many minutes passed since the last one "
                                                                      "(so a kill loses at most that much work).")
    class_weights: Literal["balanced", "none"] = Field("balanced", description="Loss weight per class: sklearn 'balanced' (FARCER) or none.")
    seed: int = Field(0, description="Seed of weights init and data order.")
    pid_file: str | None = Field(None, description="Rank 0 writes its pid and step here after each step (fault-tolerance test).")
    min_step_seconds: float = Field(0.0, ge=0, description="Pad each step to at least this long (demos and the fault-tolerance test, so a kill lands mid-run).")

    @model_validator(mode="after")
    def _phases(self) -> TrainSettings:
        if self.mode == "coarse_to_fine" and not 0 < self.phase1_steps < self.max_steps:
            raise ValueError(f"coarse_to_fine needs 0 < train.phase1_steps < train.max_steps, got {self.phase1_steps} and {self.max_steps}")
        return self


class RaySettings(BaseModel):
    """The Ray Train run."""

    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(1, gt=0, description="Training workers (one per GPU on GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(2, gt=0, description="CPUs per worker; also its OMP_NUM_THREADS.")
    backend: Literal["gloo", "nccl"] | None = Field(None, description="torch.distributed backend (default: nccl on GPU, gloo on CPU).")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    storage_path: str | None = Field(None, description="Where Ray keeps checkpoints (shared storage on several nodes).")
    name: str | None = Field(None, description="Run name; null = fresh per run. Reusing a name resumes that run.")
    address: str | None = Field(None, description="Ray address for `mer finetune` (null: start a local instance; jobs attach to their cluster).")


class EvalSettings(BaseModel):
    """Evaluation after training (dev selects, test reports)."""

    model_config = ConfigDict(extra="forbid")
    splits: list[str] = Field(default_factory=list, description="Splits to evaluate the fine-tuned model on (empty: none).")
    subset: int | None = Field(None, gt=0, description="Fixed stratified seeded subset of target utterances per split (null: all).")
    seed: int = Field(0, description="Seed of the subsets.")
    baseline_shots: list[int] = Field(
        default_factory=list, description="Also score the untrained base model with these shot counts (chosen on the first split)."
    )
    batch_size: int = Field(4, gt=0, description="Prompts per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the evaluation runs (auto: CUDA when the driver process sees a GPU).")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class FinetuneConfig(BaseModel):
    """One fine-tuning job."""

    model_config = ConfigDict(extra="forbid")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    deepspeed: str = Field("zero2_cpu.json", description="DeepSpeed JSON: a path, or a file name in mer_ray/mllm/deepspeed/.")
    deepspeed_overrides: dict[str, Any] = Field(default_factory=dict, description="Merged into the DeepSpeed JSON (nested dicts merge).")
    out: str = Field("runs/finetune", description="Where the adapter, projectors and JSON are written.")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        try:
            resolve_deepspeed(self.deepspeed)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        if self.train.mode == "projector" and not self.model.projectors:
            raise ValueError("train.mode 'projector' needs at least one model.projectors entry (nothing would train)")
        if self.train.mode in ("lora", "coarse_to_fine") and self.model.lora is None:
            raise ValueError(f"train.mode {self.train.mode!r} needs model.lora settings")
        if self.train.mode == "coarse_to_fine" and not self.model.projectors:
            raise ValueError("train.mode 'coarse_to_fine' needs projectors for phase 1")
        p = self.prompt
        if p.template == "farcer-dialogue-v1" and (p.past_labels or p.reasoning or p.n_shots):
            raise ValueError("prompt.template farcer-dialogue-v1 takes no past_labels, reasoning or n_shots (no label token is ever written)")
        if p.references and p.template != "farcer-dialogue-v1":
            raise ValueError("prompt.references needs prompt.template farcer-dialogue-v1")
        return absolute_paths(self)  # Ray workers run in other directories


def resolve_deepspeed(name: str) -> Path:
    """The DeepSpeed JSON for ``name`` (a path, or a file in ``mer_ray/mllm/deepspeed``)."""
    for p in (Path(name).expanduser(), DS_DIR / name):
        if p.is_file():
            return p
    raise FileNotFoundError(f"DeepSpeed config {name!r} not found (as a path or in {DS_DIR}: {sorted(x.name for x in DS_DIR.glob('*.json'))})")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: FinetuneConfig, world: int) -> dict:
    """The DeepSpeed dict for ``world`` workers: 'auto' filled from ``cfg``, ``deepspeed_overrides`` merged in."""
    import torch

    ds = _merge(json.loads(resolve_deepspeed(cfg.deepspeed).read_text()), cfg.deepspeed_overrides)
    ds.pop("_comment", None)
    t = cfg.train
    fill = {"train_micro_batch_size_per_gpu": t.micro_batch, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.micro_batch * t.grad_accum * world}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if "optimizer" in ds and ds["optimizer"].get("params", {}).get("lr") == "auto":
        ds["optimizer"]["params"]["lr"] = t.lr
    return ds


def _abs(p: str | None) -> str | None:
    return None if p is None or "://" in p else str(Path(p).expanduser().resolve())


def absolute_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Resolve relative paths against the current directory: Ray workers run elsewhere."""
    d = cfg.data
    d.meld_dir, d.features = _abs(d.meld_dir), _abs(d.features)
    d.manifests = {k: _abs(v) for k, v in d.manifests.items()}
    d.references = {k: _abs(v) for k, v in d.references.items()}
    cfg.out = _abs(cfg.out)
    cfg.ray.storage_path = _abs(cfg.ray.storage_path)
    if Path(cfg.model.base).expanduser().exists():
        cfg.model.base = _abs(cfg.model.base)
    if Path(cfg.deepspeed).is_file():
        cfg.deepspeed = _abs(cfg.deepspeed)
    return cfg
