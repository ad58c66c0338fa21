"""Request and response bodies of the HTTP API (the field names are a contract).

Every request model forbids unknown fields, so ``{"video": "/etc/passwd"}`` is a
422 that names the field, and media can only arrive as base64 content: a value
that is not strict base64 (as every file path with a dot or of the wrong
length is) is refused with a message saying it looks like a path. The server
writes decoded bytes to its own temporary file; no request names a server file.
"""

from __future__ import annotations

import base64
import binascii
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mer_ray.data.labels import LABEL_SETS

_PATHLIKE = re.compile(r"^(?:/|\./|\.\./|~|[A-Za-z]:[\\/]|file:|[a-z][a-z0-9+.-]*://)|\.(?:mp4|mkv|avi|mov|webm|wav|mp3|flac|ogg|m4a)$", re.I)
SESSION_ID = r"^[A-Za-z0-9_.:-]{1,64}$"


def decode_media(value: str, field: str) -> bytes:
    """Strictly decode base64 ``value``; the error names ``field`` and says when it looks like a path."""
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        if _PATHLIKE.search(value.strip()):
            raise ValueError(f"{field} looks like a file path ({value[:80]!r}); media must be sent as base64-encoded content, never as a path") from None
        raise ValueError(f"{field} is not valid base64 content") from None
    if not data:
        raise ValueError(f"{field} is empty")
    return data


class Utterance(BaseModel):
    """One turn of a dialogue. Media are optional and sent as base64 content."""

    model_config = ConfigDict(extra="forbid")

    speaker: str = Field(..., max_length=200, description="Speaker name or id; turns by the same speaker share it.")
    text: str = Field(..., description="Transcript of the utterance (may be empty when media are sent).")
    video_b64: str | None = Field(None, description="Base64 of a video clip of the utterance (any container PyAV reads).")
    audio_b64: str | None = Field(None, description="Base64 of an audio clip of the utterance.")

    @field_validator("video_b64", "audio_b64")
    @classmethod
    def _media_is_content(cls, v: str | None, info) -> str | None:
        if v is not None:
            decode_media(v, info.field_name)
        return v


class _Options(BaseModel):
    label_set: str | None = Field(None, description="Label set of the answer; default: the model's own. Others need a written-down mapping.")
    use_llm: bool = Field(True, description="False skips the LLM member (vanilla model only, low latency).")

    @field_validator("label_set")
    @classmethod
    def _known_label_set(cls, v: str | None) -> str | None:
        if v is not None and v not in LABEL_SETS:
            raise ValueError(f"unknown label set {v!r}; known: {sorted(LABEL_SETS)}")
        return v


class RecognizeRequest(_Options):
    """``POST /v1/recognize``: one dialogue."""

    model_config = ConfigDict(extra="forbid")

    utterances: list[Utterance] = Field(..., min_length=1, description="The dialogue's turns, in order (at least one).")


class BatchRequest(BaseModel):
    """``POST /v1/recognize:batch``: several dialogues, each with its own options."""

    model_config = ConfigDict(extra="forbid")

    dialogues: list[RecognizeRequest] = Field(..., min_length=1)


class TurnRequest(_Options):
    """``POST /v1/sessions/{session_id}/turns``: the next turn of a streamed dialogue."""

    model_config = ConfigDict(extra="forbid")

    utterance: Utterance


class UtterancePrediction(BaseModel):
    label: str = Field(..., description="Argmax of ``probs``.")
    probs: dict[str, float] = Field(..., description="The ensemble's final distribution.")
    vanilla: dict[str, float] = Field(..., description="The vanilla model's distribution.")
    llm: dict[str, float] | None = Field(None, description="The LLM refiner's distribution (mean over its receptive fields); null when the LLM was skipped.")
    receptive_fields: list[list[int]] = Field(
        default_factory=list, description="[first_turn, last_turn] (inclusive, 0-based positions) of each field the LLM saw for this turn."
    )
    mllm: dict[str, float] | None = Field(None, description="The fine-tuned multimodal LLM's distribution, when that member is deployed.")


class RecognizeResponse(BaseModel):
    label_set: str
    labels: list[str]
    utterances: list[UtterancePrediction]
    timing_ms: dict[str, float] = Field(..., description="Wall milliseconds per member, and ``total``.")


class BatchResponse(BaseModel):
    results: list[RecognizeResponse]


class TurnResponse(BaseModel):
    session_id: str
    turn: int = Field(..., description="0-based position of this turn in the session.")
    n_context: int = Field(..., description="Turns (this one included) the prediction used as context.")
    label_set: str
    labels: list[str]
    utterance: UtterancePrediction
    timing_ms: dict[str, float]


class LabelsResponse(BaseModel):
    model_label_set: str = Field(..., description="The label set the deployed models predict.")
    label_sets: dict[str, list[str]] = Field(..., description="Every label set a request may name, with its labels.")
    available: list[str] = Field(..., description="Label sets this deployment can answer in (the model's, and those with a mapping from it).")
