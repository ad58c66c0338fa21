"""Backend configs and the one ``build_scorer`` that turns a config into a :class:`LabelScorer`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mer_ray.config import StrictModel


class BackendConfig(StrictModel):
    """Which LLM scores the labels, and how."""

    kind: Literal["llama_cpp", "transformers", "openai"] = Field("llama_cpp", description="backend")
    model: str = Field("gemma3-270m", description="GGUF path or embedded name (llama_cpp); model dir (transformers); "
                                                  "served model name (openai)")
    gguf_file: str | None = Field(None, description="transformers only: a GGUF file name inside ``model``")
    base_url: str | None = Field(None, description="openai only: e.g. http://127.0.0.1:8000/v1")
    n_ctx: int = Field(4096, ge=128, description="context length (llama_cpp)")
    n_threads: int = Field(1, ge=1, description="CPU threads per engine")
    batch_size: int = Field(8, ge=1, description="transformers: sequences per padded forward pass")
    reuse_prefix: bool = Field(True, description="llama_cpp: reuse the KV cache of the shared prefix")
    chat: bool = Field(True, description="wrap prompts in the model's chat template when it has one")
    chat_template_from: str | None = Field(None, description="openai: a GGUF path/name whose chat template to use")
    max_workers: int = Field(4, ge=1, description="openai: concurrent HTTP requests")
    http_mode: Literal["echo", "forced"] = Field("echo", description="openai: 'echo' (vLLM, OpenAI semantics) or "
                                                 "'forced' (llama-cpp-python's server, see mer_ray/llm/openai_http.py)")


def build_scorer(cfg: BackendConfig | dict):
    """Instantiate the backend a config names."""
    cfg = BackendConfig.model_validate(cfg)
    if cfg.kind == "llama_cpp":
        from mer_ray.llm.llamacpp import LlamaCppScorer

        return LlamaCppScorer(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, reuse_prefix=cfg.reuse_prefix)
    if cfg.kind == "transformers":
        from mer_ray.llm.hf import TransformersScorer

        return TransformersScorer(cfg.model, gguf_file=cfg.gguf_file, batch_size=cfg.batch_size, n_threads=cfg.n_threads)
    from mer_ray.llm.openai_http import OpenAICompletionsScorer

    if not cfg.base_url:
        raise ValueError("backend kind 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
    return OpenAICompletionsScorer(cfg.base_url, cfg.model, max_workers=cfg.max_workers,
                                   chat_template_from=cfg.chat_template_from, mode=cfg.http_mode)


def prompt_format(scorer, chat: bool = True) -> tuple[str | None, str, str]:
    """(chat template or None, BOS text, EOS text) to render prompts for ``scorer``."""
    tpl = scorer.chat_template if chat else None
    return tpl, getattr(scorer, "bos_token", ""), getattr(scorer, "eos_token", "")


def prompt_format_for(cfg: BackendConfig | dict) -> tuple[str | None, str, str]:
    """(chat template, BOS, EOS) for rendering prompts, without loading model weights."""
    cfg = BackendConfig.model_validate(cfg)
    if not cfg.chat:
        tpl_from = None
    elif cfg.kind == "llama_cpp":
        tpl_from = cfg.model
    elif cfg.kind == "openai":
        tpl_from = cfg.chat_template_from
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model, gguf_file=cfg.gguf_file)
        return tok.chat_template, tok.bos_token or "", tok.eos_token or ""
    if tpl_from is None:
        return None, "", ""
    from mer_ray.llm.llamacpp import gguf_prompt_format

    return gguf_prompt_format(tpl_from)
