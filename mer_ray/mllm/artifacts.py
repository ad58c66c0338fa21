"""The fine-tuned multimodal LLM's files, the only code that writes or reads them.

A directory holds ``adapter/`` (peft LoRA, when trained), ``projectors.safetensors``
(when the model has projectors) and ``mer_mllm.json`` (label set, prompt template
and shots, model config, class weights, training facts). It reloads without Ray
or DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mer_ray.mllm.build import ModelConfig, load_causal_lm
from mer_ray.mllm.model import MultimodalLM
from mer_ray.mllm.projector import build_projectors, embed_scale_of

META_FILE = "mer_mllm.json"
#: Everything a fine-tuned directory holds that loading reads (``calibration.json`` is optional).
ARTIFACT_FILES = ("adapter", "projectors.safetensors", META_FILE, "calibration.json")


def read_meta(art_dir: str | Path) -> dict:
    """``mer_mllm.json`` of a fine-tuned directory."""
    path = Path(art_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{art_dir} is not a fine-tuned model directory: {META_FILE} missing")
    return json.loads(path.read_text())


def save_artifacts(out: str | Path, state: dict[str, torch.Tensor], model: MultimodalLM, meta: dict) -> Path:
    """Write ``adapter/`` (peft), ``projectors.safetensors`` and ``mer_mllm.json``.

    Args:
        state: the full module state dict (from a DeepSpeed ZeRO-3 gather or ``model.state_dict()``),
            whose trainable entries are written; ``model`` supplies the peft config.
        meta: JSON-able facts (model and prompt config, labels, shots, class weights).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proj = {k[len("projectors."):]: v.detach().cpu().float().contiguous() for k, v in state.items() if k.startswith("projectors.")}
    if proj:
        save_file(proj, str(out / "projectors.safetensors"))
    if hasattr(model.lm, "peft_config"):
        from peft import get_peft_model_state_dict

        lora = {k[len("lm."):]: v.detach().cpu() for k, v in state.items() if k.startswith("lm.") and "lora_" in k}
        model.lm.save_pretrained(str(out / "adapter"), state_dict=get_peft_model_state_dict(model.lm, state_dict=lora))
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_artifacts(art_dir: str | Path, base: str | None = None) -> tuple[MultimodalLM, object, dict]:
    """Reload a fine-tuned model without Ray or DeepSpeed: ``(model in eval mode, tokenizer, meta)``.

    Args:
        base: override the base model recorded in the JSON (a moved directory).
    """
    art_dir = Path(art_dir)
    meta = read_meta(art_dir)
    cfg = ModelConfig(**{**meta["model"], "lora": None, **({"base": base} if base else {})})
    lm, tok = load_causal_lm(cfg.base, cfg.dtype)
    if (art_dir / "adapter").exists():
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(art_dir / "adapter"))
    model = MultimodalLM(lm, load_projectors(art_dir, cfg, lm)).eval()
    model.requires_grad_(False)
    return model, tok, meta


def load_projectors(art_dir: str | Path, cfg: ModelConfig, lm) -> torch.nn.ModuleDict:
    """The projectors of ``art_dir`` (``projectors.safetensors``), sized for ``lm``'s hidden width.

    Raises:
        ValueError: the saved weights do not fit ``cfg.projectors`` (the message names the keys).
    """
    from safetensors.torch import load_file

    hidden = lm.get_input_embeddings().weight.shape[1]
    projectors = build_projectors(cfg.projectors, hidden, embed_scale_of(lm)).to(getattr(torch, cfg.dtype))
    if cfg.projectors:
        missing, unexpected = projectors.load_state_dict(load_file(str(Path(art_dir) / "projectors.safetensors")), strict=False)
        # Only a projector saved before feature scaling existed lacks its scaler (it stays the identity).
        if unexpected or [k for k in missing if ".norm." not in k]:
            raise ValueError(f"{art_dir}: projector weights do not fit (missing {missing}, unexpected {unexpected})")
    return projectors.requires_grad_(False)
