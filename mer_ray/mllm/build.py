"""Configs and ``build_*`` functions for :class:`~mer_ray.mllm.model.MultimodalLM`.

The base LLM comes from a local Hugging Face directory or a GGUF file
(transformers' ``gguf_file=``; the embedded name ``gemma3-270m`` resolves to
the packaged Gemma 3 270M). Loading a GGUF dequantises it (~28 s for Gemma
270M), so the first load converts it once to a Hugging Face directory in
``~/.cache/mer_ray/hf`` (behind a file lock) and later loads read that.

Its files are written and read by :mod:`mer_ray.mllm.artifacts` only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mer_ray.mllm.model import MultimodalLM
from mer_ray.mllm.projector import ProjectorConfig, build_projectors, embed_scale_of


class LoraSettings(BaseModel):
    """LoRA on the LLM (peft)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj"], description="Module names LoRA wraps.")


class ModelConfig(BaseModel):
    """The LLM, its projectors and LoRA."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field("gemma3-270m", description="HF directory, GGUF file, or embedded name (gemma3-270m, smollm2-135m-instruct).")
    label_set: str = Field("meld7", description="Label set name (mer_ray.data.labels).")
    projectors: dict[str, ProjectorConfig] = Field(default_factory=dict, description="Modality name -> projector (visual, audio...).")
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="LoRA settings; null for projector-only training.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype of the base LLM.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (large models).")

    @field_validator("label_set")
    @classmethod
    def _known(cls, v: str) -> str:
        from mer_ray.data.labels import get_label_set

        get_label_set(v)
        return v


def resolve_base(base: str) -> Path:
    """A Hugging Face directory for ``base``, converting a GGUF once into ``~/.cache/mer_ray/hf``."""
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"base model directory {p} has no config.json")
        return p
    from mer_ray.assets import gguf_path

    gguf = gguf_path(base)
    root = Path(os.environ.get("MER_HF_CACHE", Path.home() / ".cache" / "mer_ray" / "hf"))
    target = root / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / ".done").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock")):
        if (target / ".done").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF quantizer stays attached after dequantising and breaks save_pretrained.
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(target)
        tok.save_pretrained(target)
        (target / "source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        (target / ".done").touch()
    return target


def load_causal_lm(base: str, dtype: str = "float32"):
    """``(model, tokenizer)`` for ``base`` (see :func:`resolve_base`), frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base(base)
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm.requires_grad_(False)
    return lm.eval(), tok


def build_mllm(cfg: ModelConfig, lm=None, tokenizer=None) -> tuple[MultimodalLM, object]:
    """The LLM (loaded unless given) + LoRA (if configured) + projectors; only LoRA and projectors train."""
    if lm is None:
        lm, tokenizer = load_causal_lm(cfg.base, cfg.dtype)
    lm.requires_grad_(False)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
        lm = get_peft_model(lm, lc)
    hidden = lm.get_input_embeddings().weight.shape[1]
    projectors = build_projectors(cfg.projectors, hidden, embed_scale_of(lm))
    projectors.to(getattr(torch, cfg.dtype))
    return MultimodalLM(lm, projectors), tokenizer


def trainable_groups(model: MultimodalLM) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters split into ``projector`` and ``lora`` groups (for per-group learning rates)."""
    groups: dict[str, list] = {"projector": [], "lora": []}
    for name, p in model.named_parameters():
        if name.startswith("projectors."):
            groups["projector"].append(p)
        elif "lora_" in name:
            groups["lora"].append(p)
    return {k: v for k, v in groups.items() if v}


def set_trainable(model: MultimodalLM) -> None:
    """Freeze the base LLM; LoRA weights and projectors train."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("projectors.") or "lora_" in name)
