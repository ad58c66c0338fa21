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
    """The streaming session store: SQLite on local disk (the default) or a shared Redis server."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "redis"] = "sqlite"
    """``sqlite``: a file on this node's disk, opened by every Ingress replica of the node (WAL, one transaction
    per write), so sessions outlive any process; ``redis``: a Redis server shared by the replicas of every node."""
    dir: str | None = None
    """SQLite: the folder of ``sessions.db``. None: ``<models_dir>/../sessions``, beside the models whose feature
    vectors the sessions hold (another models dir never reads them)."""
    redis_url: str | None = None
    """Redis: the server, e.g. ``redis://redis:6379/0`` (required with ``backend: redis``)."""
    redis_password_env: str | None = None
    """Redis: the environment variable holding the server's password (a password never goes in a YAML)."""
    key_prefix: str = Field("mer:sessions", min_length=1)
    """Redis: prefix of every key, so one server can hold several deployments' sessions."""
    ttl_s: float = Field(3600.0, gt=0)
    """A session idle this long is closed; its id then stays a tombstone for ``ttl_s`` more (its turns get 409)."""
    max_sessions: int = Field(10000, ge=1)
    """Most open sessions; the least recently used are closed first (and become tombstones)."""
    max_turns: int = Field(64, ge=1)
    """Turns kept per session; older turns drop out of the context (and can no longer be replayed)."""
    busy_timeout_s: float = Field(10.0, gt=0)
    """SQLite: how long a write waits for another replica's transaction before the request gets a 503."""

    @model_validator(mode="after")
    def _check(self) -> SessionConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("sessions.backend 'redis' needs sessions.redis_url (e.g. redis://host:6379/0)")
        if self.redis_password_env and self.backend != "redis":
            raise ValueError("sessions.redis_password_env is for backend: redis only")
        return self


class AdaptersConfig(BaseModel):
    """Named fine-tuned adapters (``<models_dir>/mllm/adapters/<name>/``) behind the same endpoint.

    A request that names one (the ``serve_multiplexed_model_id`` header or a ``model`` field) is answered by
    that adapter alone, in its own label set; any other request gets the ensemble's answer (docs/serve.md).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Deploy the ``Adapters`` deployment; the build fails when ``mllm/adapters/`` holds no adapter. With False,
    a request naming an adapter gets 422."""
    max_num_models_per_replica: int = Field(3, ge=1)
    """Adapters each replica keeps loaded (Serve's LRU, ``@serve.multiplexed``); an evicted one reloads on its next
    request with identical outputs."""
    threads: int | None = Field(None, ge=1)
    """``torch.set_num_threads`` in each ``Adapters`` replica. None: ``torch_threads``."""
    batch_size: int = Field(4, ge=1)
    """Prompts per forward pass of the shared base LLM."""


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
    adapters: AdaptersConfig = AdaptersConfig()
    """Named fine-tuned adapters on one base LLM, chosen per request."""
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
    layout: Literal["split", "colocated"] = "split"
    """``split``: the ``Featurizer`` and ``Vanilla`` deployments, each scaled on its own (two hops per request);
    ``colocated``: both text models in one ``FeaturizerVanilla`` deployment (one hop; ``serve/colocated.yaml``)."""

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser()
