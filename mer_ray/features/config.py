"""Typed, validated configuration of ``mer extract``.

Every field has a docstring; :func:`mer_ray.config.load` reads YAML or a dict and
fails with a message naming the bad field. Resources are set per stage, so on a
GPU cluster the encoders can take GPUs while decoding stays on CPUs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StageResources(BaseModel):
    """Ray resources and batching of one pipeline stage."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.5, gt=0)
    """CPUs reserved per actor. Fractional, so small stages share cores."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved per actor (0 on CPU machines)."""
    pool_size: int = Field(1, ge=1)
    """Number of actors in the stage's ``ActorPoolStrategy``."""


class ExtractConfig(BaseModel):
    """All settings of the extraction pipeline."""

    model_config = ConfigDict(extra="forbid")

    media: bool = True
    """Decode the rows' ``video``/``audio``; False gives text features only (every row ``ok``)."""
    n_frames: int = Field(8, ge=1, le=256)
    """Frames sampled uniformly over each utterance's span."""
    max_width: int = Field(320, ge=32)
    """Frames wider than this are downscaled (keeps decode output small)."""
    sample_rate: int = Field(16000, ge=8000)
    """Audio is resampled to this rate, mono."""
    max_seconds: float = Field(30.0, gt=0)
    """Longest span decoded per utterance; longer spans are cut (and reported)."""
    face_min_size: int = Field(24, ge=8)
    """Smallest face side in pixels that the Haar cascade reports."""
    faces: bool = True
    """Run face detection and the facial-expression model."""
    audio_encoder: Literal["egemaps", "hf", "none"] = "egemaps"
    """``egemaps``: openSMILE eGeMAPSv02 functionals (88-d); ``hf``: HuBERT/wav2vec2 from ``audio_model_dir``."""
    audio_model_dir: str | None = None
    """Local directory of a Hugging Face HuBERT/wav2vec2 model (``audio_encoder: hf``)."""
    image_model_dir: str | None = None
    """Local directory of a Hugging Face ViT; when set, ``image_embedding`` holds its mean CLS vector."""
    text: bool = True
    """Compute ``text_embedding`` with the packaged MiniLM."""
    text_model_dir: str | None = None
    """A local sentence-transformers directory instead of the packaged MiniLM."""
    shard_size: int = Field(64, ge=1)
    """Rows per output Parquet shard (the unit of resume)."""
    batch_rows: int = Field(8, ge=1)
    """Rows per Ray block and per batch in every stage. Small, so memory stays bounded (frames of
    at most this many utterances are in flight per stage task) whatever the number of videos."""
    text_batch_rows: int = Field(64, ge=1)
    """Rows per block when no media stage runs (text only): bigger batches for MiniLM."""
    object_store_mb: int = Field(256, ge=64)
    """Object store size when ``run_extract`` starts its own local Ray."""
    decode: StageResources = StageResources(num_cpus=0.5, pool_size=1)
    """Decoding (PyAV)."""
    face: StageResources = StageResources(num_cpus=0.5, pool_size=2)
    """Haar face detection and crops."""
    expression: StageResources = StageResources(num_cpus=0.25, pool_size=1)
    """The fer mini-Xception expression model."""
    image: StageResources = StageResources(num_cpus=0.5, pool_size=1)
    """The optional ViT image encoder."""
    audio: StageResources = StageResources(num_cpus=0.5, pool_size=1)
    """The audio encoder."""
    text_stage: StageResources = StageResources(num_cpus=0.5, pool_size=1)
    """The text encoder."""
    fuse: bool = True
    """Run every stage back to back in one actor per pool slot (:class:`~mer_ray.features.stages.FusedStage`)
    when no stage asks for GPUs: decoded frames never travel through the object store, and each worker
    starts once instead of once per stage. Set false (or give a stage GPUs) for one actor pool per stage,
    e.g. CPU decoding feeding GPU encoders."""
    fused: StageResources = StageResources(num_cpus=1.0, pool_size=2)
    """Resources of the fused pool (default: one core and one actor per core of a 2-core machine; raise
    ``pool_size`` with the cluster's cores)."""
    threads: int | None = Field(1, ge=1)
    """Threads per library (torch, OpenCV, FFmpeg) in every worker; 1 is fastest for these small
    models when the pool gives each actor a fraction of a core. Null leaves each library's default."""

    @model_validator(mode="after")
    def _check(self) -> ExtractConfig:
        if self.audio_encoder == "hf" and not self.audio_model_dir:
            raise ValueError("audio_encoder 'hf' needs audio_model_dir (a local HuBERT/wav2vec2 directory)")
        return self

    def sha256(self) -> str:
        """Hash of the settings that change the output (resources excluded)."""
        keep = self.model_dump(exclude={"object_store_mb", "batch_rows", "text_batch_rows", "decode", "face", "expression", "image",
                                        "audio", "text_stage", "threads", "fuse", "fused"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
