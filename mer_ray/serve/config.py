"""Typed, validated configuration of the serving application.

The same object is built from ``mer serve`` options, from the ``args:`` of an
application in ``serve/*.yaml`` (``import_path: mer_ray.serve.builder:app_builder``),
or from a dict in tests. Unknown keys are errors, so a typo in a YAML fails at
deploy time with the key's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODELS_DIR = "runs/demo/models"


class LLMConfig(BaseModel):
    """The Lantern LLM refiner member."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Deploy the LLM member at all; with False every request behaves as ``use_llm: false``."""
    backend: Literal["llama_cpp", "http", "transformers"] = "llama_cpp"
    """``llama_cpp``: a GGUF in the replica; ``http``: an OpenAI-compatible completions server (vLLM,
    llama.cpp server); ``transformers``: a local Hugging Face model directory."""
    model: str | None = None
    """llama.cpp: an embedded name (``smollm2-135m-instruct``, ``gemma3-270m``) or a GGUF path; http: the
    served model id; transformers: a model dir. None: the LLM recorded in ``<models>/fusion/fusion.json``
    (the one fusion was fitted on), else the Lantern backend's default."""
    base_url: str | None = None
    """Base URL of the completions server (``backend: http``), e.g. ``http://vllm:8000/v1``."""
    sizes: list[int | None] | None = None
    """Receptive-field sizes (``null``: the whole dialogue). None: the sizes fusion was fitted on
    (``fusion.json``), else ``[4, null]``."""
    stride: int | None = Field(None, ge=1)
    """Window stride. None: ``fusion.json``'s, else 1."""
    template: str | None = None
    """Prompt template name or ``.j2`` path. None: the template fusion was fitted on (``fusion.json``),
    else the default (``lantern_v2``)."""
    n_ctx: int = Field(4096, ge=128)
    """llama.cpp context length."""
    n_threads: int = Field(1, ge=1)
    """llama.cpp threads per replica."""
    reuse_prefix_across_requests: bool = True
    """Keep the llama.cpp KV cache of the last request's prompts, so a new request re-evaluates only
    what differs (bit-identical logits). ``mer bench serve`` turns it off: nothing is cached between requests."""

    @model_validator(mode="after")
    def _check(self) -> LLMConfig:
        if self.backend == "http" and not self.base_url:
            raise ValueError("llm.backend 'http' needs llm.base_url (an OpenAI-compatible completions endpoint)")
        return self


class SessionConfig(BaseModel):
    """The streaming session store (a named, detached Ray actor shared by every replica)."""

    model_config = ConfigDict(extra="forbid")

    actor_name: str = "mer_session_store"
    """Name of the store actor; replicas look it up by name, so a restarted replica finds it."""
    namespace: str = "mer_serve"
    """Ray namespace of the store actor."""
    ttl_s: float = Field(3600.0, gt=0)
    """A session idle this long is dropped."""
    max_sessions: int = Field(10000, ge=1)
    """Most sessions kept; the least recently used go first."""
    max_turns: int = Field(64, ge=1)
    """Turns kept per session; older turns drop out of the context."""
    persist_dir: str | None = None
    """If set, every session is also written here, so the store survives its own restart."""


class ServeConfig(BaseModel):
    """All settings of the ``mer`` Serve application."""

    model_config = ConfigDict(extra="forbid")

    models_dir: str = DEFAULT_MODELS_DIR
    """Holds ``vanilla/``, ``fusion/`` and optionally ``mllm/`` (what the training commands write)."""
    use_mllm: bool = False
    """Add the fine-tuned multimodal LLM in ``<models_dir>/mllm/`` as one more ensemble member."""
    llm: LLMConfig = LLMConfig()
    """The LLM refiner."""
    sessions: SessionConfig = SessionConfig()
    """Streaming sessions."""
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    """Largest request body; larger gets 413."""
    max_text_chars: int = Field(2000, ge=1)
    """Longest utterance text; longer gets 422."""
    max_utterances: int = Field(128, ge=1)
    """Most utterances in one dialogue."""
    max_dialogues: int = Field(32, ge=1)
    """Most dialogues in one ``/v1/recognize:batch`` request."""
    max_media_bytes: int = Field(8 * 2**20, ge=1)
    """Largest decoded ``video_b64``/``audio_b64`` of one utterance; larger gets 413."""
    api_key_env: str | None = None
    """If set, requests must send ``Authorization: Bearer <key>`` where the key is this environment variable's value."""
    torch_threads: int = Field(1, ge=1)
    """``torch.set_num_threads`` in each model replica."""

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser()
